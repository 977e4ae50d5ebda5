"""The public entry points: one measured run, closed or open loop."""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.closed import ClosedDriver
from loadtest.openloop import Arrival, OpenDriver
from loadtest.stats import RunResult
from loadtest.target import Target

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ClosedLoad:
    """``concurrency`` clients, one connection each, sending back to back."""

    concurrency: int
    duration: float
    warmup: float = 0.0
    request_timeout: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class OpenLoad:
    """``rate`` requests/s on a pool of ``connections``, latency from the intended send time."""

    rate: float
    duration: float
    warmup: float = 0.0
    connections: int = 64
    arrival: Arrival = "constant"
    request_timeout: float = DEFAULT_TIMEOUT_S
    seed: int = 0


Load = ClosedLoad | OpenLoad


async def run_closed(
    target: Target,
    bodies: RequestPool,
    concurrency: int,
    duration: float,
    warmup: float = 0.0,
    *,
    request_timeout: float = DEFAULT_TIMEOUT_S,
    checker: OutputChecker | None = None,
) -> RunResult:
    """Closed loop for ``warmup + duration`` seconds; only the last ``duration`` is measured."""
    driver = ClosedDriver(target, bodies, concurrency, request_timeout, checker)
    return await driver.measure(
        warmup, duration, connections=concurrency, offered_rps=None, arrival=None
    )


async def run_open(
    target: Target,
    bodies: RequestPool,
    rate: float,
    duration: float,
    warmup: float = 0.0,
    *,
    connections: int = 64,
    arrival: Arrival = "constant",
    request_timeout: float = DEFAULT_TIMEOUT_S,
    seed: int = 0,
    checker: OutputChecker | None = None,
) -> RunResult:
    """Open loop at ``rate`` requests/s; requests whose intended time falls in the measured
    window are counted, however long after the window they finish.
    """
    driver = OpenDriver(target, bodies, rate, connections, arrival, request_timeout, checker, seed)
    return await driver.measure(
        warmup, duration, connections=connections, offered_rps=rate, arrival=arrival
    )


async def run_load(
    target: Target, bodies: RequestPool, load: Load, checker: OutputChecker | None = None
) -> RunResult:
    """Either shape from its description (what sweep and compare pass around)."""
    if isinstance(load, ClosedLoad):
        return await run_closed(
            target,
            bodies,
            load.concurrency,
            load.duration,
            load.warmup,
            request_timeout=load.request_timeout,
            checker=checker,
        )
    return await run_open(
        target,
        bodies,
        load.rate,
        load.duration,
        load.warmup,
        connections=load.connections,
        arrival=load.arrival,
        request_timeout=load.request_timeout,
        seed=load.seed,
        checker=checker,
    )
