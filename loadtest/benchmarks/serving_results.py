"""What the serving benchmark measured: workloads, medians, ratios, targets, the JSON document."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loadtest import RunResult, SweepResult
from loadtest.compare import FIGURES

FLOOR, SLUICE, SLUICE_OFF = "floor", "sluice", "sluice-nobatch"
MLSERVERS = ("mlserver", "mlserver-batching")
SLO_P99_MS = 10.0


@dataclass(frozen=True, slots=True)
class Workload:
    """One load shape; ``clients`` 0 is the open-loop sweep for the max rate within the SLO."""

    key: str
    title: str
    rows: int
    clients: int = 0

    @property
    def sweep(self) -> bool:
        return self.clients == 0


WORKLOADS: tuple[Workload, ...] = (
    Workload("1row-1c", "1 row, 1 client", 1, 1),
    Workload("1row-16c", "1 row, 16 clients", 1, 16),
    Workload("1row-64c", "1 row, 64 clients", 1, 64),
    Workload("16row-16c", "16 rows, 16 clients", 16, 16),
    Workload("sweep", f"open loop, max req/s at p99 ≤ {SLO_P99_MS:g} ms", 1),
)
C1, C64, R16, SWEEP = "1row-1c", "1row-64c", "16row-16c", "sweep"


@dataclass(frozen=True, slots=True)
class InProcess:
    """The model in process, one thread, median seconds per call: XGBoost's own
    ``inplace_predict`` and Sluice's compiled trees (None where they do not apply)."""

    predict_1_s: float
    predict_64_s: float
    calls: int
    compiled_1_s: float | None = None
    compiled_64_s: float | None = None

    @property
    def rows_per_s_64(self) -> float:
        """Rows/s of the fastest executor in process at batch 64."""
        fastest = min(t for t in (self.predict_64_s, self.compiled_64_s) if t is not None)
        return 64 / fastest

    @property
    def fastest_64(self) -> str:
        compiled = self.compiled_64_s
        return (
            "compiled trees"
            if compiled is not None and compiled < self.predict_64_s
            else ("XGBoost inplace_predict")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "predict_1row_us": self.predict_1_s * 1e6,
            "predict_64rows_us": self.predict_64_s * 1e6,
            "compiled_1row_us": self.compiled_1_s * 1e6 if self.compiled_1_s else None,
            "compiled_64rows_us": self.compiled_64_s * 1e6 if self.compiled_64_s else None,
            "rows_per_s_at_64": self.rows_per_s_64,
            "fastest_at_64": self.fastest_64,
            "calls": self.calls,
        }


State = Literal["measured", "skipped", "unavailable", "failed"]


@dataclass(slots=True)
class ContenderStatus:
    label: str
    state: State = "measured"
    reason: str = ""
    log: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    verified: str = ""  # how its answers were checked before measuring


@dataclass(slots=True)
class Outcome:
    """Every run of one contender under one workload."""

    runs: list[RunResult] = field(default_factory=list)
    sweeps: list[SweepResult] = field(default_factory=list)

    def median(self) -> dict[str, float]:
        """Median of each figure over the runs (the sweep: of the max rate, 0 when none passed)."""
        if self.sweeps:
            return {"max_rps": _median([s.max_rate or 0.0 for s in self.sweeps])}
        return {name: _median([get(r) for r in self.runs]) for name, get in FIGURES.items()}

    def median_sweep(self) -> SweepResult | None:
        """The run whose max rate is the median (what the plot shows)."""
        ranked = sorted(self.sweeps, key=lambda s: s.max_rate or 0.0)
        return ranked[(len(ranked) - 1) // 2] if ranked else None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"median": self.median()}
        if self.sweeps:
            doc["sweeps"] = [s.to_dict() for s in self.sweeps]
        else:
            doc["runs"] = [r.to_dict() for r in self.runs]
        return doc


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


@dataclass(slots=True)
class Suite:
    """The whole run: who took part, the in-process floors, and the outcomes."""

    meta: dict[str, Any]
    workloads: tuple[Workload, ...]
    contenders: dict[str, ContenderStatus]
    in_process: InProcess
    outcomes: dict[str, dict[str, Outcome]] = field(default_factory=dict)

    def outcome(self, workload: str, contender: str) -> Outcome:
        return self.outcomes.setdefault(workload, {}).setdefault(contender, Outcome())

    def figure(self, workload: str, contender: str, name: str) -> float:
        """A median figure, NaN when it was not measured."""
        outcome = self.outcomes.get(workload, {}).get(contender)
        if outcome is None or not (outcome.runs or outcome.sweeps):
            return math.nan
        return outcome.median().get(name, math.nan)

    def rate(self, workload: str, contender: str) -> float:
        """The workload's headline rate: req/s (2xx), or the sweep's max rate."""
        name = "max_rps" if workload == SWEEP else "ok_rps"
        return self.figure(workload, contender, name)

    def mlserver_best(self, workload: str) -> float:
        rates = [r for r in (self.rate(workload, m) for m in MLSERVERS) if not math.isnan(r)]
        return max(rates) if rates else math.nan

    def ratios(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per workload and contender: its rate over the floor's and over MLServer's best."""
        return {
            w.key: {
                c: {
                    "vs_floor": _ratio(self.rate(w.key, c), self.rate(w.key, FLOOR)),
                    "vs_mlserver_best": _ratio(self.rate(w.key, c), self.mlserver_best(w.key)),
                }
                for c in self.outcomes.get(w.key, {})
            }
            for w in self.workloads
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "contenders": {k: asdict(s) for k, s in self.contenders.items()},
            "in_process": self.in_process.to_dict(),
            "workloads": [
                {
                    **asdict(w),
                    "results": {c: o.to_dict() for c, o in self.outcomes.get(w.key, {}).items()},
                }
                for w in self.workloads
            ],
            "ratios": self.ratios(),
            "targets": [t.to_dict() for t in targets(self)],
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


@dataclass(frozen=True, slots=True)
class Check:
    """One condition of a target: its words with the numbers, and whether it held."""

    text: str
    passed: bool | None  # None: not measured


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    goal: str
    checks: tuple[Check, ...]

    @property
    def verdict(self) -> str:
        results = [c.passed for c in self.checks]
        if False in results:
            return "MISS"
        return "N/A" if None in results else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "goal": self.goal,
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
        }


def _number(value: float, unit: str) -> str:
    return f"{value:.3f} {unit}" if unit == "ms" else f"{value:,.0f} {unit}"


def ratio_check(
    label: str, value: float, reference: float, needed: float, unit: str, *, most: bool = False
) -> Check:
    """``value / reference`` against ``needed`` (at least, or at most with ``most``)."""
    if math.isnan(value) or math.isnan(reference) or not reference:
        return Check(f"{label}: not measured", None)
    ratio = value / reference
    shown, goal = (
        (f"{ratio:.1f}x", f"{needed:g}x") if needed >= 2 else (f"{ratio:.0%}", f"{needed:.0%}")
    )
    sign = "≤" if most else "≥"
    text = (
        f"{label}: {_number(value, unit)} / {_number(reference, unit)} = {shown} "
        f"(needs {sign} {goal})"
    )
    return Check(text, ratio <= needed if most else ratio >= needed)


def bound_check(label: str, value: float, bound: float, detail: str) -> Check:
    """``value`` at most ``bound`` milliseconds; ``detail`` says where the bound comes from."""
    if math.isnan(value) or math.isnan(bound):
        return Check(f"{label}: not measured", None)
    return Check(f"{label}: {value:.3f} ms ≤ {bound:.3f} ms ({detail})", value <= bound)


def half_load_p99(suite: Suite) -> tuple[float, float]:
    """Sluice's p99 in the open-loop sweep at the first step at or above half its 64-client
    rate, and that step's share of the rate (medians over the sweeps)."""
    capacity = suite.rate(C64, SLUICE)
    outcome = suite.outcomes.get(SWEEP, {}).get(SLUICE)
    if outcome is None or math.isnan(capacity):
        return math.nan, math.nan
    found = []
    for sweep in outcome.sweeps:
        above = [s for s in sweep.steps if s.offered_rps >= capacity / 2]
        if above:
            step = min(above, key=lambda s: s.offered_rps)
            found.append((step.result.latency.p99_ms, step.offered_rps / capacity))
    if not found:
        return math.nan, math.nan
    return _median([p for p, _ in found]), _median([share for _, share in found])


def targets(suite: Suite) -> list[Target]:
    """The issue's targets, each for Sluice with batching on (its default)."""
    rate, fig, ml = suite.rate, suite.figure, suite.mlserver_best
    floor_p50 = fig(C1, FLOOR, "p50_ms")
    half_p99, half_share = half_load_p99(suite)
    return [
        Target(
            "a",
            "1 row, 64 clients: Sluice ≥ 70% of the floor and ≥ 9x MLServer's best, p99 ≤ 10 ms",
            (
                ratio_check("Sluice / floor", rate(C64, SLUICE), rate(C64, FLOOR), 0.7, "req/s"),
                ratio_check("Sluice / MLServer", rate(C64, SLUICE), ml(C64), 9, "req/s"),
                bound_check("Sluice p99", fig(C64, SLUICE, "p99_ms"), SLO_P99_MS, "the SLO"),
            ),
        ),
        Target(
            "b",
            "1 client: Sluice p50 ≤ floor p50 + 100 µs, and with batching within 5% of without",
            (
                bound_check(
                    "Sluice p50",
                    fig(C1, SLUICE, "p50_ms"),
                    floor_p50 + 0.1,
                    f"floor {floor_p50:.3f} + 0.100",
                ),
                ratio_check(
                    "p50 batching on / off",
                    fig(C1, SLUICE, "p50_ms"),
                    fig(C1, SLUICE_OFF, "p50_ms"),
                    1.05,
                    "ms",
                    most=True,
                ),
            ),
        ),
        Target(
            "c",
            "16 rows, 16 clients: Sluice rows/s ≥ 60% of the fastest in-process executor at "
            "batch 64",
            (
                ratio_check(
                    f"Sluice / in-process ({suite.in_process.fastest_64})",
                    fig(R16, SLUICE, "rows_per_s"),
                    suite.in_process.rows_per_s_64,
                    0.6,
                    "rows/s",
                ),
            ),
        ),
        Target(
            "d",
            f"open loop: Sluice max rate at p99 ≤ {SLO_P99_MS:g} ms ≥ 10x MLServer's best",
            (ratio_check("Sluice / MLServer", rate(SWEEP, SLUICE), ml(SWEEP), 10, "req/s"),),
        ),
        Target(
            "e",
            "open loop at half the 64-client capacity: Sluice p99 ≤ 3 ms",
            (
                bound_check(
                    "Sluice p99",
                    half_p99,
                    3.0,
                    f"sweep step at {half_share:.0%} of the 64-client rate"
                    if not math.isnan(half_share)
                    else "no sweep step",
                ),
            ),
        ),
    ]
