"""How ``sluice serve`` runs uvicorn: the guarded protocol, timeouts, TLS, the drain,
start-up warnings. One process or ``--workers N``, the same ``run``."""

from __future__ import annotations

import ipaddress
import logging
import math
import resource
import socket
import ssl
from functools import partial
from typing import Any

from uvicorn.config import STARTUP_FAILURE, Config

from server.config import Settings
from server.http.access import forwarded_headers
from server.http.app import create_app
from server.http.draining import DrainingServer
from server.http.protocol import ConnectionLimits, GuardedHttpProtocol

log = logging.getLogger("sluice.http")

DEFAULT_MAX_CONNECTIONS = 4096
# Descriptors kept for everything but client sockets: model files, the thread pool's
# pipes, Redis and OTLP connections, log files.
FD_RESERVE = 256


def max_connections(settings: Settings) -> int:
    """The configured limit, else 4096 or what the file-descriptor limit leaves room for."""
    configured = settings.limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else DEFAULT_MAX_CONNECTIONS
    if configured is None:
        return max(1, min(DEFAULT_MAX_CONNECTIONS, room))
    if configured > room:
        log.warning(
            "limits.max_connections %d exceeds what the file-descriptor limit (%d) leaves "
            "room for; raise `ulimit -n`",
            configured,
            soft,
        )
    return configured


def connection_limits(settings: Settings) -> ConnectionLimits:
    limits = settings.limits
    return ConnectionLimits(
        max_connections=max_connections(settings),
        max_concurrent_requests=limits.max_concurrent_requests,
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
        max_header_bytes=limits.max_header_bytes,
        retry_after_s=settings.retry_after_s,
        target_latency_s=(
            limits.target_latency_ms / 1000 if limits.target_latency_ms is not None else None
        ),
        body_budget=settings.body_budget,
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` beyond host and port."""
    security = settings.security
    options: dict[str, Any] = {
        "http": partial(GuardedHttpProtocol, limits=connection_limits(settings)),
        "ws": "none",  # no WebSocket routes: no upgrade handling to attack
        "proxy_headers": forwarded_headers(settings),
        "timeout_keep_alive": max(1, math.ceil(settings.limits.keep_alive_timeout_s)),
    }
    if security.tls_certfile is not None:
        options["ssl_certfile"] = str(security.tls_certfile)
        options["ssl_keyfile"] = str(security.tls_keyfile)
    if security.tls_ca_certs is not None:
        options["ssl_ca_certs"] = str(security.tls_ca_certs)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def run(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Serve the app until SIGTERM or SIGINT: how every ``sluice serve`` process runs.

    The single process binds ``settings.host:port`` here; a ``--workers`` worker passes
    its ``SO_REUSEPORT`` socket. Either way the same protocol, limits, timeouts, TLS and
    drain. Returns the exit code: 0, or uvicorn's start-up failure.
    """
    config = Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        **uvicorn_options(settings),
    )
    server = DrainingServer(config)
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILURE


def exposure_warnings(settings: Settings) -> list[str]:
    """Loud start-up warnings for a bind that anyone on the network can reach."""
    if _loopback(settings.host):
        return []
    where = f"{settings.host}:{settings.port}"
    if not settings.security.authenticated:
        return [
            f"SECURITY: serving on {where} WITHOUT API KEYS: anyone who can reach this "
            "address can run predictions and load or unload models. Configure "
            "security.keys or security.keys_file, or bind to 127.0.0.1 behind a gateway."
        ]
    if settings.security.tls_certfile is None:
        return [
            f"SECURITY: serving plain HTTP on {where}: API keys cross the network in clear "
            "text. Use --ssl-certfile/--ssl-keyfile, or terminate TLS in front of Sluice."
        ]
    return []


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
