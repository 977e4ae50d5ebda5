"""SIGTERM under load: every request a client got to send is answered, none is reset.

A real ``sluice serve`` (one process, and two workers under the supervisor)
takes a closed loop of keep-alive clients from the project's load generator,
and SIGTERM arrives mid-run. The clients keep sending, and reconnecting, until
well after the server is gone. Every request written to a connection must come
back as an HTTP answer (200, or 503 when refused for overload); a connection
attempt may be refused (nothing was sent on it), but no request may be reset,
cut off or left unanswered. The scenario runs a few times per shape, so SIGTERM
lands at different moments of the traffic.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server
from workers_support import Workers, start_workers

from loadtest import BodySpec, RunResult, Target, fetch_metadata, random_pool, run_closed

CLIENTS = 32
ROUNDS = 3
# Long enough for the load to get under way, the drain (about a second) and the exit; after
# the exit the clients only meet refused connections until the run ends.
RUN_S = 8.0
UNDER_WAY = 300  # requests one process has answered before SIGTERM is sent
# The only failure a client may see: a connection attempt refused, before anything was sent.
CLEAN_ERRORS = {"connect_refused"}


async def _until_answered(url: str, count: int, process: subprocess.Popen[bytes]) -> None:
    """Bounded poll: the process behind ``url`` has answered ``count`` requests."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline and process.poll() is None:
            response = await client.get(f"{url}/v2/models/tree/stats")
            stats = response.json()["model_stats"]
            if sum(s["inference_stats"]["success"]["count"] for s in stats) >= count:
                return
            await asyncio.sleep(0.05)  # polling a condition, bounded by the deadline
    raise AssertionError("the load never got under way")


async def _load_through_sigterm(url: str, process: subprocess.Popen[bytes]) -> RunResult:
    target = Target.from_url(url, "tree")
    async with asyncio.timeout(30):
        meta = await fetch_metadata(target)
    pool = random_pool(target, meta, BodySpec(rows_per_request=1))
    load = asyncio.ensure_future(run_closed(target, pool, CLIENTS, RUN_S, request_timeout=20))
    await _until_answered(url, UNDER_WAY, process)
    process.send_signal(signal.SIGTERM)
    return await load


def _assert_every_request_answered(result: RunResult, log: Path) -> None:
    lost = {kind: n for kind, n in result.errors.items() if kind not in CLEAN_ERRORS}
    assert lost == {}, f"requests lost at shutdown: {lost}\n{log.read_text()[-3000:]}"
    assert set(result.statuses) <= {200, 503}, result.statuses
    assert result.statuses.get(200, 0) >= UNDER_WAY


@pytest.mark.slow
def test_sigterm_under_load_one_process(tiny_repo: Path, tmp_path: Path) -> None:
    for round_no in range(ROUNDS):
        server: RunningServer = start_server(tiny_repo, tmp_path / f"server-{round_no}.log")
        try:
            result = asyncio.run(_load_through_sigterm(server.url, server.process))
            # uvicorn re-raises SIGTERM once it has shut down gracefully.
            assert server.process.wait(30) in (0, -signal.SIGTERM)
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
        _assert_every_request_answered(result, server.log)
        assert "Application shutdown complete" in server.log.read_text()


@pytest.mark.slow
def test_sigterm_under_load_two_workers(tiny_repo: Path, tmp_path: Path) -> None:
    for round_no in range(ROUNDS):
        workers: Workers = start_workers(tiny_repo, tmp_path / f"workers-{round_no}.log", 2)
        try:
            result = asyncio.run(_load_through_sigterm(workers.url, workers.process))
            assert workers.process.wait(30) == 0
        finally:
            workers.stop()
        _assert_every_request_answered(result, workers.log)
        assert workers.log.read_text().count("Application shutdown complete") == 2
