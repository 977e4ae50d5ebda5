"""``sluice serve --workers N``: N server processes on one port, one supervisor.

One Python process serves about one core's worth of event loop, so a host
with more cores runs more processes. Each worker is a full ``sluice serve``
(its own models, batchers, thread pool and telemetry) that binds the same
address with ``SO_REUSEPORT``; the kernel spreads new connections across
them. The supervisor only starts workers, forwards SIGTERM / SIGINT (each
worker then stops accepting, finishes its in-flight requests and drains its
batchers) and waits. When a worker dies unexpectedly the supervisor stops the
others and exits non-zero: the orchestrator restarts the whole server, and
no port is ever left half-served.

Each worker gets ``service.instance.id`` (``<host>:<port>/worker-<k>``) in its
OpenTelemetry resource, and a private Unix socket in a run directory over
which a sibling's ``/metrics`` collects it (``server.fleet_metrics``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from server.config import Settings

log = logging.getLogger("sluice.workers")

# Set by the supervisor in each worker's environment: where the workers' metrics sockets
# live. Process plumbing between the supervisor and its children, not a setting.
FLEET_DIR_ENV = "_SLUICE_FLEET_DIR"  # not SLUICE_*: those are settings
SUPERVISOR_ENV = "_SLUICE_SUPERVISOR_PID"  # the process whose death stops the worker
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_WORKER_FAILED = 1


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker this process is, and where its siblings are."""

    index: int
    count: int
    fleet_dir: Path

    @property
    def instance_id(self) -> str:
        return instance_id(self.index)


def instance_id(index: int) -> str:
    """``service.instance.id`` of worker ``index`` on this host."""
    return f"{socket.gethostname()}/worker-{index}"


def resolve_workers(value: str) -> int:
    """``auto`` is the CPUs this process may run on (its affinity mask), else a count >= 1."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', got {value!r}") from None
    if count < 1:
        raise ValueError(f"--workers must be at least 1, got {count}")
    return count


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes can bind too (the kernel balances them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def without_workers_flag(argv: list[str]) -> list[str]:
    """The command line a worker runs: the supervisor's, less ``--workers``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def shared_state_note(settings: Settings, workers: int) -> str:
    """What the operator should know about state that is not shared between workers."""
    cache_shared = settings.cache.backend == "redis"
    feedback_shared = settings.redis.url is not None
    local = [
        *([] if cache_shared else ["the result cache"]),
        *([] if feedback_shared else ["feedback joins"]),
        "drift windows",
    ]
    shared = [
        *(["the result cache"] if cache_shared else []),
        *(["feedback joins"] if feedback_shared else []),
    ]
    note = f"{workers} workers; per worker: {_listed(local)}"
    if shared:
        note += f"; shared through Redis: {_listed(shared)}"
    if not cache_shared:
        needed = "cache.backend: redis" if feedback_shared else "redis.url and cache.backend: redis"
        note += f" (set {needed} to share the cache)"
    return note + "; /metrics on any worker reports every worker"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def supervise(argv: list[str], settings: Settings, workers: int, threads_given: bool) -> int:
    """Run ``workers`` copies of ``sluice serve`` (``argv`` without --workers) until stopped.

    Unless ``--inference-threads`` was given, each worker gets its share of the CPUs
    (at least one), so N workers do not each start a pool as wide as the machine.
    """
    if settings.port == 0:
        print("sluice: error: --workers needs a fixed --port", file=sys.stderr)
        return 2
    fleet = Path(tempfile.mkdtemp(prefix="sluice-fleet-"))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    log.warning(shared_state_note(settings, workers))
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(workers):
            command = [sys.executable, "-m", "server", *argv, "--worker-index", str(index)]
            if not threads_given:
                command += ["--inference-threads", str(threads)]
            env = {**os.environ, FLEET_DIR_ENV: str(fleet), SUPERVISOR_ENV: str(os.getpid())}
            env["OTEL_RESOURCE_ATTRIBUTES"] = _with_instance(
                os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""), instance_id(index)
            )
            children.append(subprocess.Popen(command, env=env))
        log.info("supervising %d workers on %s:%d", workers, settings.host, settings.port)
        failed = _wait(children, lambda: stopping)
        if failed and not stopping:
            stop(signal.SIGTERM, None)
            for child in children:
                child.wait()
            return EXIT_WORKER_FAILED
        # uvicorn re-raises the signal it caught once it has shut down gracefully, so a
        # worker we stopped exits "killed by SIGTERM": that is a clean stop.
        clean = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(child.returncode in clean for child in children) else EXIT_WORKER_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(fleet, ignore_errors=True)


def _wait(children: list[subprocess.Popen[bytes]], stopping: Callable[[], bool]) -> bool:
    """Block until every child exits (True: one exited before we asked it to)."""
    pending = list(children)
    while pending:
        pid, status = os.wait()
        for child in pending:
            if child.pid == pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                pending.remove(child)
                if not stopping():
                    log.error(
                        "worker pid %d exited (%d); stopping the others", pid, child.returncode
                    )
                    return True
                break
    return False


def _with_instance(attributes: str, instance: str) -> str:
    # The operator's own attributes stay; service.instance.id is ours to set per worker.
    kept = [
        a
        for a in attributes.split(",")
        if a.strip() and not a.strip().startswith("service.instance.id=")
    ]
    return ",".join([*kept, f"service.instance.id={instance}"])


def serve_worker(settings: Settings, index: int) -> int:
    """One worker: ``sluice serve`` on a socket bound with SO_REUSEPORT.

    It serves exactly as the single process does (``server.http.serving.run``): the
    guarded protocol and its limits, the timeouts, TLS and the drain at shutdown.
    """
    from server.http import serving

    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s",
    )
    _follow_supervisor(os.environ.get(SUPERVISOR_ENV))
    return serving.run(settings, sockets=[reuseport_socket(settings.host, settings.port)])


def _follow_supervisor(supervisor: str | None) -> None:
    """Have the kernel SIGTERM this worker (a drain, as the supervisor's own stop) when
    the supervisor dies.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers:
    they went on serving the port (SO_REUSEPORT) with the old configuration, beside a
    restarted server's workers (found in the test suite: orphans of a killed supervisor
    still listening minutes later). Linux only (prctl); a no-op elsewhere.
    """
    if supervisor is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != supervisor:  # it died before the kernel could be told
        log.warning("the supervisor (pid %s) is gone: stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)
