"""Two targets under the same load, measured alternately (A, B, A, B, ...).

Alternating rounds spread slow drifts of the machine (thermal, noisy
neighbours, caches) over both targets instead of charging them to one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.runner import Load, run_load
from loadtest.stats import RunResult
from loadtest.target import Target

FIGURES: dict[str, Callable[[RunResult], float]] = {
    "throughput_rps": lambda r: r.throughput_rps,
    "ok_rps": lambda r: r.ok_rps,
    "rows_per_s": lambda r: r.rows_per_s,
    "mean_ms": lambda r: r.latency.mean_ms,
    "p50_ms": lambda r: r.latency.p50_ms,
    "p90_ms": lambda r: r.latency.p90_ms,
    "p99_ms": lambda r: r.latency.p99_ms,
    "p999_ms": lambda r: r.latency.p999_ms,
    "max_ms": lambda r: r.latency.max_ms,
    "failed": lambda r: float(r.failed),
    "client_cpu_util": lambda r: r.client_cpu_util,
}


@dataclass(frozen=True, slots=True)
class Arm:
    """One side of a comparison: where to send and what."""

    target: Target
    bodies: RequestPool
    checker: OutputChecker | None = None


@dataclass(slots=True)
class CompareResult:
    a: str
    b: str
    runs_a: list[RunResult] = field(default_factory=list)
    runs_b: list[RunResult] = field(default_factory=list)

    def medians(self, runs: list[RunResult]) -> dict[str, float]:
        """Median of each figure over the rounds."""
        return {name: _median([get(r) for r in runs]) for name, get in FIGURES.items()}

    @property
    def median_a(self) -> dict[str, float]:
        return self.medians(self.runs_a)

    @property
    def median_b(self) -> dict[str, float]:
        return self.medians(self.runs_b)

    @property
    def ratios(self) -> dict[str, float]:
        """B/A for every figure (NaN where A is zero or missing)."""
        a, b = self.median_a, self.median_b
        return {k: b[k] / a[k] if a[k] and not math.isnan(a[k]) else math.nan for k in FIGURES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "rounds": len(self.runs_a),
            "median_a": self.median_a,
            "median_b": self.median_b,
            "ratio_b_over_a": self.ratios,
            "runs_a": [r.to_dict() for r in self.runs_a],
            "runs_b": [r.to_dict() for r in self.runs_b],
        }


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


async def run_compare(
    a: Arm,
    b: Arm,
    load: Load,
    rounds: int = 3,
    *,
    on_run: Callable[[str, int, RunResult], None] | None = None,
) -> CompareResult:
    """``rounds`` runs of each target, interleaved A then B, under the same ``load``."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    result = CompareResult(a.target.label, b.target.label)
    for round_no in range(rounds):
        for side, arm, runs in (("A", a, result.runs_a), ("B", b, result.runs_b)):
            run = await run_load(arm.target, arm.bodies, load, arm.checker)
            runs.append(run)
            if on_run is not None:
                on_run(side, round_no, run)
    return result
