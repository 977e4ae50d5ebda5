"""The HTTP protocol's own cost per request: Sluice's guarded protocol against uvicorn's.

    python -m loadtest.benchmarks.protocol_bench [--connections 64] [--requests 200000]
        [--rounds 7] [--baseline REV]

No sockets and no app work: ``--connections`` protocol instances on a uvloop
event loop, each given a fake transport, are fed keep-alive requests (a
``POST`` with a small JSON body, as a V2 client sends) by ``data_received``,
and a minimal ASGI app reads the body and answers fixed bytes. The loop runs
until every answer is written, then the next request goes in. What differs
between contenders is the protocol class only, so the difference of their
CPU time per request is the protocol's overhead. ``--baseline REV`` adds the
guarded protocol as it was at git revision REV (its module loaded from
``git show``). All of these run behind uvicorn's proxy-headers layer, as
uvicorn does by default; "sluice" is the guarded protocol as ``sluice
serve`` runs it with nothing configured, without that layer. Contenders
alternate, round by round; the figure is each one's median of the rounds
(process CPU time, so a busy neighbour on the same core inflates all alike
rather than one of them).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parents[2]
BODY = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[0.5,1,2,3]}]}'
REQUEST = (
    b"POST /v2/models/fraud/infer HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"
    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
ANSWER = b'{"model_name":"fraud","outputs":[]}'
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))],
}
END = {"type": "http.response.body", "body": ANSWER}


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(START)
    await send(END)


class Transport:
    """Just enough of an asyncio transport: counts what is written."""

    def __init__(self) -> None:
        self.answers = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        if data.endswith(ANSWER):
            self.answers += 1
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the protocol refused a request: {data[:60]!r}")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_protocol(self, protocol: Any) -> None: ...


def guarded_factory(module: types.ModuleType) -> Callable[..., Any]:
    # Production limits, except that no timeout and no latency target can be reached: a
    # slow run (under valgrind, or a busy machine) measures the same code path.
    limits = module.ConnectionLimits(
        max_connections=4096,
        max_concurrent_requests=1024,
        header_timeout_s=1e9,
        body_timeout_s=1e9,
        max_header_bytes=32 * 1024,
        target_latency_s=1e9,
    )
    return partial(module.GuardedHttpProtocol, limits=limits)


def _source(revision: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def _module(name: str, source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def module_at(revision: str) -> types.ModuleType:
    """``server.http.protocol`` as it was at ``revision``, with that revision's overload."""
    overload = _module(
        f"overload_at_{revision}",
        _source(revision, "server/http/overload.py"),
        f"{revision}:server/http/overload.py",
    )
    current = sys.modules.get("server.http.overload")
    sys.modules["server.http.overload"] = overload  # what the old protocol imports
    try:
        return _module(
            f"protocol_at_{revision}",
            _source(revision, "server/http/protocol.py"),
            f"{revision}:server/http/protocol.py",
        )
    finally:
        if current is not None:
            sys.modules["server.http.overload"] = current
        else:
            del sys.modules["server.http.overload"]


async def run(
    factory: Callable[..., Any], connections: int, requests: int, proxy_headers: bool = True
) -> float:
    """CPU seconds per request for ``requests`` requests over ``connections``."""
    loop = asyncio.get_running_loop()
    config = Config(
        app=app, lifespan="off", access_log=False, log_level="warning", proxy_headers=proxy_headers
    )
    config.load()
    state = ServerState()
    pairs = []
    for _ in range(connections):
        protocol = factory(config, state, {}, loop)
        transport = Transport()
        protocol.connection_made(transport)
        pairs.append((protocol, transport))
    rounds = requests // connections
    started = time.process_time()
    for n in range(1, rounds + 1):
        for protocol, _ in pairs:
            protocol.data_received(REQUEST)
        # Turns of the loop until every answer is out: that turning is part of what is measured.
        while any(transport.answers < n for _, transport in pairs):  # noqa: ASYNC110
            await asyncio.sleep(0)
    spent = time.process_time() - started
    for protocol, transport in pairs:
        transport.closing = True
        protocol.connection_lost(None)
    while state.tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)
    return spent / (rounds * connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", action="append", default=[], metavar="REV")
    args = parser.parse_args(argv)
    from server.config import Settings
    from server.http import protocol
    from server.http.access import forwarded_headers

    # Name: (protocol, uvicorn's proxy-headers layer on). "sluice" is the guarded protocol
    # as `sluice serve` runs it with nothing configured.
    contenders: dict[str, tuple[Callable[..., Any], bool]] = {"uvicorn": (HttpToolsProtocol, True)}
    for revision in args.baseline:
        contenders[f"guarded@{revision}"] = (guarded_factory(module_at(revision)), True)
    contenders["guarded"] = (guarded_factory(protocol), True)
    contenders["sluice"] = (guarded_factory(protocol), forwarded_headers(Settings(), {}))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (factory, proxy) in contenders.items():
            seconds = uvloop.run(run(factory, args.connections, args.requests, proxy))
            times[name].append(seconds * 1e6)
    base = statistics.median(times["uvicorn"])
    for name, each in times.items():
        median = statistics.median(each)
        print(
            f"{name:>24}: {median:6.2f} us/request (+{median - base:5.2f} over uvicorn), "
            f"rounds {' '.join(f'{t:.2f}' for t in each)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
