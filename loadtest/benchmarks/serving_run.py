"""Running the serving benchmark: servers up, answers checked, workloads measured in turn."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest import (
    BodySpec,
    ClosedLoad,
    ExpectedOutputs,
    LoadTestError,
    OutputChecker,
    RequestPool,
    RunResult,
    SweepPlan,
    SweepResult,
    Target,
    rows_pool,
    run_closed,
    run_load,
    run_sweep,
)
from loadtest.benchmarks.serving_contenders import Contender, Setup, launch
from loadtest.benchmarks.serving_model import ModelData, booster
from loadtest.benchmarks.serving_results import C64, SLO_P99_MS, ContenderStatus, Suite, Workload
from loadtest.benchmarks.serving_servers import Pinning, Server, ServerFailed, Unavailable

CHECK_ROWS, CHECK_ROWS_PER_REQUEST = 32, 4
SWEEP_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how often, resolved from the flags (explicit > ``--quick`` > normal)."""

    runs: int
    duration: float
    warmup: float
    settle: float
    step_duration: float
    step_warmup: float
    start_fraction: float
    factor: float
    binary: bool


@dataclass(slots=True)
class Running:
    """A contender whose server is up, and where to send its load."""

    contender: Contender
    server: Server
    target: Target
    pools: dict[int, RequestPool] = field(default_factory=dict)

    def pool(self, data: ModelData, rows: int, binary: bool) -> RequestPool:
        """Requests of ``rows`` holdout rows each, encoded once per contender."""
        if rows not in self.pools:
            spec = BodySpec(rows_per_request=rows, binary=binary)
            self.pools[rows] = rows_pool(self.target, data.meta, data.rows, spec)
        return self.pools[rows]


def start_servers(
    contenders: list[Contender],
    setup: Setup,
    pinning: Pinning,
    logs: Path,
    statuses: dict[str, ContenderStatus],
    stack: contextlib.ExitStack,
    ready_timeout: float,
) -> dict[str, Running]:
    """Start every contender that can run here, then wait for each to be ready."""
    started: dict[str, Running] = {}
    for contender in contenders:
        status = statuses[contender.key]
        try:
            plan = launch(contender, setup)
        except Unavailable as exc:
            status.state, status.reason = "unavailable", str(exc)
            continue
        status.config, status.log = plan.config, str(logs / f"{contender.key}.log")
        server = stack.enter_context(
            Server(contender.label, plan.command, Path(status.log), pinning)
        )
        target = Target.from_url(server.url, setup.model)
        started[contender.key] = Running(contender, server, target)
    for key, running in list(started.items()):
        try:
            running.server.wait_ready(f"/v2/models/{setup.model}/ready", ready_timeout)
        except ServerFailed as exc:
            statuses[key].state, statuses[key].reason = "unavailable", str(exc)
            running.server.stop()
            del started[key]
    return started


async def verify(running: Running, data: ModelData, binary: bool) -> tuple[bool, str]:
    """Whether the contender answers holdout rows as XGBoost does in process, and in words."""
    expected = booster(data.artifact).inplace_predict(data.matrix[:CHECK_ROWS])
    values = {running.contender.output: np.asarray(expected, dtype=np.float64).reshape(-1, 1)}
    checker = OutputChecker(ExpectedOutputs(values), rtol=1e-5, atol=1e-7)
    spec = BodySpec(rows_per_request=CHECK_ROWS_PER_REQUEST, binary=binary)
    pool = rows_pool(running.target, data.meta, data.rows.slice(0, CHECK_ROWS), spec)
    result = await run_closed(running.target, pool, 1, 0.5, checker=checker)
    if result.ok == 0:
        return False, f"no successful answer (statuses {result.statuses}, errors {result.errors})"
    if result.mismatches or not result.checked:
        return False, f"{result.mismatches} of {result.checked} answers differ from in process"
    return True, (
        f"{result.checked} answers of {CHECK_ROWS_PER_REQUEST} rows equal in-process "
        "predictions (rtol 1e-5)"
    )


def progress(step: str, running: Running, result: RunResult | SweepResult) -> None:
    if isinstance(result, SweepResult):
        rate = result.max_rate
        figures = f"max {rate:,.0f} req/s" if rate else "no step passed"
        figures += f" ({len(result.steps)} steps)"
    else:
        latency = result.latency
        figures = (
            f"{result.ok_rps:9,.0f} req/s  p50 {latency.p50_ms:7.3f}  p99 {latency.p99_ms:7.3f} ms"
        )
        if result.failed:
            figures += f"  {result.failed} failed"
    print(f"{step} {running.contender.key:18} {figures}", flush=True)


async def measure(
    workload: Workload, running: Running, data: ModelData, plan: Plan, suite: Suite
) -> RunResult | SweepResult:
    pool = running.pool(data, workload.rows, plan.binary)
    if not workload.sweep:
        load = ClosedLoad(workload.clients, plan.duration, plan.warmup)
        return await run_load(running.target, pool, load)
    base = suite.figure(C64, running.contender.key, "ok_rps")
    if not base > 0:
        probe = ClosedLoad(64, plan.duration, plan.warmup)
        base = (await run_load(running.target, running.pool(data, 1, plan.binary), probe)).ok_rps
    result = await run_sweep(running.target, pool, sweep_plan(base, plan, plan.start_fraction))
    if result.best is None:
        # The knee lies below the first step: once more, from a quarter of it.
        low = sweep_plan(base, plan, plan.start_fraction / 4)
        result = await run_sweep(running.target, pool, low)
    return result


def sweep_plan(base_rps: float, plan: Plan, start_fraction: float) -> SweepPlan:
    """Open-loop steps from ``start_fraction`` of the closed-loop rate up to twice it."""
    start = max(base_rps * start_fraction, 10.0)
    return SweepPlan(
        slo_p99_ms=SLO_P99_MS,
        start_rps=start,
        factor=plan.factor,
        max_rps=max(2 * base_rps, start),
        step_duration=plan.step_duration,
        step_warmup=plan.step_warmup,
        connections=SWEEP_CONNECTIONS,
    )


def schedule(workloads: tuple[Workload, ...], runs: int) -> Iterator[tuple[Workload, int]]:
    for workload in workloads:
        for run in range(runs):
            yield workload, run


async def run_suite(suite: Suite, servers: dict[str, Running], data: ModelData, plan: Plan) -> None:
    """Check every contender, then measure: workloads, runs, contenders, in that nesting."""
    for key, running in list(servers.items()):
        if not running.contender.checked:
            continue
        correct, verdict = await verify(running, data, plan.binary)
        suite.contenders[key].verified = verdict
        if not correct:
            _fail(suite, servers, key, f"wrong answers: {verdict}")
    total = len(suite.workloads) * plan.runs
    for number, (workload, run) in enumerate(schedule(suite.workloads, plan.runs), 1):
        for key, running in list(servers.items()):
            step = f"[{number}/{total}] {workload.title[:22]:22} run {run + 1}/{plan.runs}"
            try:
                result = await measure(workload, running, data, plan, suite)
            except (LoadTestError, OSError) as exc:
                _fail(suite, servers, key, f"load failed: {exc}")
                continue
            outcome = suite.outcome(workload.key, key)
            if isinstance(result, SweepResult):
                outcome.sweeps.append(result)
            else:
                outcome.runs.append(result)
            progress(step, running, result)
            if not running.server.alive:
                _fail(suite, servers, key, f"server exited (log: {running.server.log})")
            await asyncio.sleep(plan.settle)


def _fail(suite: Suite, servers: dict[str, Running], key: str, reason: str) -> None:
    status = suite.contenders[key]
    status.state, status.reason = "failed", reason
    print(f"{key}: {reason}; log: {status.log}", file=sys.stderr)
    servers.pop(key).server.stop()
