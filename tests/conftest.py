"""Shared fixtures: tiny real models, the example repository, a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import build_repository

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "models"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models ``tree`` (XGBoost) and ``linear`` (ONNX), versions 1 and 2. Read-only for tests."""
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def example_repo() -> Path:
    """The example repository built by ``make models`` (``make test`` builds it first)."""
    for model in ("fraud", "churn"):
        if not any((EXAMPLES / model).glob("[0-9]*/model.*")):
            pytest.fail(f"example model '{model}' is not built: run `make models`")
    return EXAMPLES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log


def start_server(repo: Path, log: Path, env: dict[str, str] | None = None) -> RunningServer:
    """Start ``sluice serve`` on a free port and wait (bounded) until it is ready."""
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--model-repository",
            str(repo),
            "--port",
            str(port),
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return RunningServer(process, port, log)
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a readiness condition, bounded by the deadline
    process.kill()
    raise RuntimeError(f"server not ready in 60 s:\n{log.read_text()}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def example_server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    server = start_server(example_repo, tmp_path_factory.mktemp("log") / "server.log")
    yield server
    stop_server(server)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free port; stopped (if still running) at the end."""
    from redis_support import RedisServer

    server = RedisServer(tmp_path)
    yield server
    server.stop()
