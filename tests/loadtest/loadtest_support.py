"""The fake V2 server in a subprocess, and a port nobody listens on.

Not a conftest: ``tests/test_cli.py`` imports the top-level ``conftest`` by name,
which a second conftest module would shadow.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

FAKE_SERVER = Path(__file__).with_name("fake_v2_server.py")


@contextlib.contextmanager
def fake_server() -> Iterator[str]:
    """Base URL of a fresh fake server; its behaviour is picked by model name."""
    process = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        # The server prints its port once it listens; readline blocks until then.
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[1]}"
    finally:
        process.terminate()
        process.wait(10)


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
