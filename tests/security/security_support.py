"""Test helpers: fresh random API keys (digests, settings entries), real server processes."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class TestKey:
    __test__ = False  # a helper, not a test class

    id: str
    secret: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None = None
    rate_limit: str | None = None

    @property
    def entry(self) -> dict[str, Any]:
        """The settings / keys-file entry: the digest, never the key."""
        doc: dict[str, Any] = {
            "id": self.id,
            "sha256": hashlib.sha256(self.secret.encode()).hexdigest(),
            "scopes": list(self.scopes),
        }
        if self.models is not None:
            doc["models"] = list(self.models)
        if self.rate_limit is not None:
            doc["rate_limit"] = self.rate_limit
        return doc

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def header(self) -> dict[str, str]:
        return {"x-api-key": self.secret}


def new_key(key_id: str, *scopes: str, **extra: Any) -> TestKey:
    # A recognisable prefix, so a leak is easy to find in any text.
    return TestKey(key_id, "sk-test-" + secrets.token_urlsafe(24), scopes, **extra)


class Served:
    """A real ``sluice serve`` process on 127.0.0.1 (HTTP or HTTPS)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, scheme: str, log: Path):
        self.process = process
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.log = log

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(
    repo: Path,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    client: httpx.Client | None = None,
) -> Served:
    """Start ``sluice serve`` with ``args`` on a free port; wait (bounded) until it is ready.

    ``client`` checks readiness (an HTTPS one for a TLS server).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(repo),
         "--port", str(port), *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLUICE_LOG_LEVEL": "warning", **(env or {})},
    )  # fmt: skip
    scheme = "https" if "--ssl-certfile" in args else "http"
    served = Served(process, port, scheme, log)
    checker = client or httpx.Client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if checker.get(f"{served.url}/v2/health/ready", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a readiness condition, bounded by the deadline
    served.stop()
    raise RuntimeError(f"server not ready in 60 s:\n{log.read_text()}")
