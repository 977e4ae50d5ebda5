"""Find the highest offered rate that still meets a p99 latency objective.

Open loop only: the offered rate is raised step by step (geometric or
arithmetic), each step a fresh fixed-length run. A step passes when its p99 is
within the objective, it achieved (in 2xx responses) nearly the offered rate,
and almost nothing failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.openloop import Arrival
from loadtest.runner import DEFAULT_TIMEOUT_S, run_open
from loadtest.stats import RunResult
from loadtest.target import Target


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """Steps: ``start_rps``, then times ``factor`` (or +``step_rps`` when set) up to ``max_rps``.

    The sweep stops after ``max_failures`` failing steps in a row.
    """

    slo_p99_ms: float
    start_rps: float = 100.0
    factor: float = 1.25
    step_rps: float | None = None
    max_rps: float = 1_000_000.0
    step_duration: float = 5.0
    step_warmup: float = 1.0
    connections: int = 64
    arrival: Arrival = "constant"
    request_timeout: float = DEFAULT_TIMEOUT_S
    min_achieved: float = 0.95
    max_failed_ratio: float = 0.01
    max_failures: int = 1

    def __post_init__(self) -> None:
        if self.slo_p99_ms <= 0 or self.start_rps <= 0:
            raise ValueError("the SLO and the start rate must be positive")
        if self.step_rps is None and self.factor <= 1.0:
            raise ValueError("the sweep factor must be above 1")
        if self.step_rps is not None and self.step_rps <= 0:
            raise ValueError("the sweep step must be positive")
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")

    def rates(self) -> Iterator[float]:
        rate = self.start_rps
        while rate <= self.max_rps:
            yield rate
            rate = rate + self.step_rps if self.step_rps is not None else rate * self.factor


@dataclass(slots=True)
class SweepStep:
    offered_rps: float
    result: RunResult
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "offered_rps": self.offered_rps,
            "passed": self.passed,
            "reason": self.reason,
            "result": self.result.to_dict(),
        }


@dataclass(slots=True)
class SweepResult:
    plan: SweepPlan
    steps: list[SweepStep] = field(default_factory=list)

    @property
    def best(self) -> SweepStep | None:
        """The highest passing step (the knee is just above it)."""
        passing = [s for s in self.steps if s.passed]
        return max(passing, key=lambda s: s.offered_rps) if passing else None

    @property
    def max_rate(self) -> float | None:
        best = self.best
        return best.offered_rps if best else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "plan": asdict(self.plan),
            "max_rate_rps": best.offered_rps if best else None,
            "max_rate_achieved_rps": best.result.ok_rps if best else None,
            "max_rate_p99_ms": best.result.latency.p99_ms if best else None,
            "steps": [s.to_dict() for s in self.steps],
        }


def judge(plan: SweepPlan, offered: float, result: RunResult) -> tuple[bool, str]:
    """Whether one step meets the objective, and in words why not."""
    attempted = result.completed + sum(result.errors.values())
    if result.ok == 0:
        return False, "no successful responses"
    if attempted and result.failed / attempted > plan.max_failed_ratio:
        return False, f"{result.failed} of {attempted} requests failed"
    if result.latency.p99_ms > plan.slo_p99_ms:
        return False, f"p99 {result.latency.p99_ms:.1f} ms > {plan.slo_p99_ms:g} ms"
    if result.ok_rps < plan.min_achieved * offered:
        return False, f"achieved {result.ok_rps:.0f}/s < {plan.min_achieved:.0%} of offered"
    return True, "ok"


async def run_sweep(
    target: Target,
    bodies: RequestPool,
    plan: SweepPlan,
    *,
    checker: OutputChecker | None = None,
    on_step: Callable[[SweepStep], None] | None = None,
    seed: int = 0,
) -> SweepResult:
    """Step through ``plan.rates()`` until ``max_failures`` consecutive steps fail."""
    sweep = SweepResult(plan)
    failures = 0
    for rate in plan.rates():
        result = await run_open(
            target,
            bodies,
            rate,
            plan.step_duration,
            plan.step_warmup,
            connections=plan.connections,
            arrival=plan.arrival,
            request_timeout=plan.request_timeout,
            seed=seed,
            checker=checker,
        )
        passed, reason = judge(plan, rate, result)
        step = SweepStep(rate, result, passed, reason)
        sweep.steps.append(step)
        if on_step is not None:
            on_step(step)
        failures = 0 if passed else failures + 1
        if failures >= plan.max_failures:
            break
    return sweep
