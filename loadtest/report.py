"""Human-readable tables on the terminal (rich)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from loadtest.compare import CompareResult
from loadtest.stats import RunResult
from loadtest.sweep import SweepResult, SweepStep

LATENCY_COLUMNS = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")


def _num(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _counts(counts: dict[int, int] | dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)) or "-"


def run_table(result: RunResult, title: str = "") -> Table:
    shape = (
        f"open loop {result.offered_rps:g} req/s ({result.arrival}), "
        f"{result.connections} connections"
        if result.mode == "open"
        else f"closed loop, {result.connections} clients"
    )
    table = Table(title=title or f"{result.target}: {shape}", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    lat = result.latency
    rows = [
        ("measured", f"{result.duration_s:.2f} s (+{result.drain_s:.2f} s to drain)"),
        ("throughput", f"{_num(result.throughput_rps, 1)} req/s"),
        ("2xx throughput", f"{_num(result.ok_rps, 1)} req/s, {_num(result.rows_per_s, 1)} rows/s"),
        ("responses", f"{result.completed:,} ({_counts(result.statuses)})"),
        ("transport errors", _counts(result.errors)),
        ("latency p50 / p90", f"{_num(lat.p50_ms, 3)} / {_num(lat.p90_ms, 3)} ms"),
        ("latency p99 / p99.9", f"{_num(lat.p99_ms, 3)} / {_num(lat.p999_ms, 3)} ms"),
        ("latency max / mean", f"{_num(lat.max_ms, 3)} / {_num(lat.mean_ms, 3)} ms"),
    ]
    if result.mode == "open":
        svc = result.service
        rows.append(
            (
                "service time p50 / p99",
                f"{_num(svc.p50_ms, 3)} / {_num(svc.p99_ms, 3)} ms (from actual send)",
            )
        )
    if result.checked:
        rows.append(("output check", f"{result.mismatches:,} of {result.checked:,} mismatched"))
    rows.append(("load generator CPU", f"{result.client_cpu_util:.0%} of one core"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def step_line(step: SweepStep) -> str:
    r = step.result
    verdict = "pass" if step.passed else f"FAIL ({step.reason})"
    return (
        f"offered {step.offered_rps:,.1f}/s achieved {r.ok_rps:,.1f}/s "
        f"p50 {_num(r.latency.p50_ms)} ms p99 {_num(r.latency.p99_ms)} ms: {verdict}"
    )


def sweep_table(sweep: SweepResult, title: str = "") -> Table:
    table = Table(title=title or f"sweep, p99 SLO {sweep.plan.slo_p99_ms:g} ms")
    for col in ("offered/s", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "failed", "verdict"):
        table.add_column(col, justify="right")
    for step in sweep.steps:
        r = step.result
        table.add_row(
            f"{step.offered_rps:,.1f}",
            f"{r.ok_rps:,.1f}",
            _num(r.latency.p50_ms, 2),
            _num(r.latency.p90_ms, 2),
            _num(r.latency.p99_ms, 2),
            f"{r.failed:,}",
            "pass" if step.passed else step.reason,
        )
    best = sweep.best
    table.caption = (
        f"max rate within SLO: {best.offered_rps:,.1f} req/s offered, "
        f"{best.result.ok_rps:,.1f} achieved"
        if best
        else "no step met the SLO"
    )
    return table


def compare_table(result: CompareResult) -> Table:
    table = Table(title=f"A = {result.a}\nB = {result.b}  (medians of {len(result.runs_a)} rounds)")
    for col in ("figure", "A", "B", "B/A"):
        table.add_column(col, justify="right")
    a, b, ratios = result.median_a, result.median_b, result.ratios
    for name in a:
        table.add_row(name, _num(a[name], 3), _num(b[name], 3), _num(ratios[name], 3))
    return table


def show(console: Console, table: Table) -> None:
    console.print(table)
