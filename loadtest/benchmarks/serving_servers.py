"""Server subprocesses for the serving benchmark: pinned, on free loopback ports, always stopped.

Each server runs in its own session (so a Ctrl-C at the terminal reaches only
the benchmark, which then stops them in order), under ``taskset`` when a core
is given, with stdout and stderr in a log file whose path every failure names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

STOP_GRACE_S = 15.0
POLL_S = 0.1


class Unavailable(Exception):
    """A contender cannot run here; the message says why and goes into the report."""


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """How to start one server listening on ``port`` of 127.0.0.1."""

    argv: Sequence[str]
    port: int
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which core the servers get and which the load generator gets (None: not pinned)."""

    server: int | None
    client: int | None
    note: str

    @classmethod
    def detect(cls, enabled: bool = True) -> Pinning:
        """Server on core 1 and load generator on core 0 when both are ours."""
        cores = sorted(os.sched_getaffinity(0))
        if not enabled:
            return cls(None, None, "not pinned (--no-pin)")
        if len(cores) < 2:
            return cls(
                None,
                None,
                f"only {len(cores)} core available: server and load generator share it, "
                "so the figures are not comparable with a pinned run",
            )
        server, client = (1, 0) if {0, 1} <= set(cores) else (cores[1], cores[0])
        return cls(server, client, f"server on core {server}, load generator on core {client}")

    def prefix(self) -> list[str]:
        return ["taskset", "--cpu-list", str(self.server)] if self.server is not None else []


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_self(core: int | None) -> None:
    """Run this process (and the load generator in it) on ``core`` only."""
    if core is not None:
        os.sched_setaffinity(0, {core})


class ServerFailed(Exception):
    """A server did not come up, or died; the message names its log file."""


class Server:
    """One running server process; a context manager that always stops it."""

    def __init__(self, name: str, command: ServerCommand, log: Path, pinning: Pinning) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.url = f"http://127.0.0.1:{command.port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [*pinning.prefix(), *command.argv],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **command.env},
                cwd=command.cwd,
                start_new_session=True,
            )

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, path: str, deadline_s: float) -> None:
        """Poll ``GET path`` until it answers 200; raise ``ServerFailed`` on exit or timeout."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise ServerFailed(
                    f"{self.name} exited with code {self.process.returncode} before it was "
                    f"ready; log: {self.log}"
                )
            if self._answers(path):
                return
            time.sleep(POLL_S)
        raise ServerFailed(f"{self.name} not ready within {deadline_s:g} s; log: {self.log}")

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL after a grace period."""
        if self.process.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait()
        # Children (MLServer's workers) that outlived their parent.
        self._signal(signal.SIGKILL)

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)
