"""The serving benchmark's tables (Markdown for the README, text for the terminal) and plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

from loadtest.benchmarks.serving_results import (
    FLOOR,
    SLO_P99_MS,
    SWEEP,
    Suite,
    Target,
    Workload,
    targets,
)


def _cell(suite: Suite, workload: Workload, contender: str) -> str:
    if workload.sweep:
        rate = suite.rate(SWEEP, contender)
        return "—" if math.isnan(rate) else f"{rate:,.0f}" if rate else "none passed"
    rps = suite.figure(workload.key, contender, "ok_rps")
    if math.isnan(rps):
        return "—"
    p50 = suite.figure(workload.key, contender, "p50_ms")
    p99 = suite.figure(workload.key, contender, "p99_ms")
    rows = f" ({rps * workload.rows:,.0f} rows/s)" if workload.rows > 1 else ""
    return f"{rps:,.0f}{rows}<br>{p50:.2f} / {p99:.2f}"


def _runs(runs: int) -> str:
    return "from 1 run" if runs == 1 else f"each figure the median of {runs} runs"


def _ratio_cell(suite: Suite, workload: Workload, contender: str) -> str:
    ratios = suite.ratios().get(workload.key, {}).get(contender)
    if not ratios:
        return "—"
    parts = []
    if contender != FLOOR and not math.isnan(ratios["vs_floor"]):
        parts.append(f"{ratios['vs_floor']:.0%} of floor")
    if not math.isnan(ratios["vs_mlserver_best"]):
        parts.append(f"{ratios['vs_mlserver_best']:.1f}x MLServer")
    return ", ".join(parts) or "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _shown(suite: Suite) -> list[str]:
    """Contenders with figures (one that failed late still shows what it measured)."""
    return [k for k in suite.contenders if any(k in o for o in suite.outcomes.values())]


def markdown(suite: Suite, plot: Path | None, readme: Path) -> str:
    """The README section: figures, ratios, targets, notes, provenance."""
    keys = _shown(suite)
    header = ["workload", *(suite.contenders[k].label for k in keys)]
    lines = _table(
        header, [[w.title, *(_cell(suite, w, k) for k in keys)] for w in suite.workloads]
    )
    lines += [
        "",
        "req/s (2xx responses), then p50 / p99 latency in ms; "
        f"{_runs(suite.meta['runs'])}. Ratios of the same figures:",
        "",
    ]
    lines += _table(
        header, [[w.title, *(_ratio_cell(suite, w, k) for k in keys)] for w in suite.workloads]
    )
    lines += ["", *_target_table(targets(suite)), "", *_notes(suite)]
    if plot is not None and plot.is_file():
        relative = os.path.relpath(plot.resolve(), readme.resolve().parent)
        if not relative.startswith(".."):
            lines += ["", f"![p99 against throughput, open loop]({relative})"]
    return "\n".join(lines)


def _target_table(found: list[Target]) -> list[str]:
    rows = [
        [f"({t.key}) {t.goal}", "<br>".join(c.text for c in t.checks), t.verdict] for t in found
    ]
    lines = _table(["target", "measured", "result"], rows)
    lines[1] = "| --- | --- | :---: |"
    return lines


def _notes(suite: Suite) -> list[str]:
    meta, floors = suite.meta, suite.in_process
    compiled = (
        f"; the compiled trees {floors.compiled_1_s * 1e6:,.0f} µs and "
        f"{floors.compiled_64_s * 1e6:,.0f} µs"
        if floors.compiled_1_s is not None and floors.compiled_64_s is not None
        else ""
    )
    notes = [
        f"- In process, one thread: XGBoost `inplace_predict` "
        f"{floors.predict_1_s * 1e6:,.0f} µs for 1 row, {floors.predict_64_s * 1e6:,.0f} µs "
        f"for 64 rows{compiled}; the fastest at 64 rows ({floors.fastest_64}) "
        f"{floors.rows_per_s_64:,.0f} rows/s; medians of {floors.calls:,} calls.",
        f"- Model `{meta['model']}` version {meta['version']}; rows from its holdout, "
        f"{'binary' if meta['binary'] else 'JSON'} tensors; closed loops {meta['duration_s']:g} s "
        f"after {meta['warmup_s']:g} s of warm-up; the sweep steps {meta['sweep']['factor']:g}x "
        f"from {meta['sweep']['start_fraction']:.0%} of the 64-client rate, "
        f"{meta['sweep']['step_duration_s']:g} s each, SLO p99 ≤ {SLO_P99_MS:g} ms.",
        f"- {meta['pinning']}; runs interleaved (each workload: run 1 of every server, then "
        "run 2...).",
    ]
    for status in suite.contenders.values():
        if status.state != "measured":
            notes.append(f"- {status.label}: {status.state}: {status.reason}")
    notes += [f"- {line}" for line in meta.get("notes", [])]
    notes += ["", f"`{meta['command']}` on {meta['date']}; {meta['machine']}."]
    return notes


def console(suite: Suite) -> str:
    """The figures and targets as plain text."""
    keys = _shown(suite)
    width = max(len(w.title) for w in suite.workloads)
    lines = ["", f"{'':{width}}  " + "  ".join(f"{k:>24}" for k in keys)]
    for w in suite.workloads:
        cells = [_cell(suite, w, k).replace("<br>", " ") for k in keys]
        lines.append(f"{w.title:{width}}  " + "  ".join(f"{c:>24}" for c in cells))
    lines.append("")
    for t in targets(suite):
        lines.append(f"{t.verdict:4}  ({t.key}) {t.goal}")
        lines += [f"        {c.text}" for c in t.checks]
    return "\n".join(lines)


def plot_sweeps(suite: Suite, path: Path) -> bool:
    """p99 against achieved throughput per contender (its median sweep); False if none ran."""
    sweeps = {
        suite.contenders[k].label: o.median_sweep()
        for k, o in suite.outcomes.get(SWEEP, {}).items()
    }
    found = {label: s for label, s in sweeps.items() if s is not None}
    if not found:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for label, sweep in found.items():
            steps = [s for s in sweep.steps if s.result.latency.count]
            ax.plot(
                [s.result.ok_rps for s in steps],
                [s.result.latency.p99_ms for s in steps],
                marker="o",
                label=label,
            )
        ax.axhline(SLO_P99_MS, color="red", linestyle="--", label="p99 SLO")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("achieved throughput (2xx responses/s)")
        ax.set_ylabel("p99 latency from intended send time (ms)")
        ax.set_title("open loop, 1-row requests (median sweep of each server)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return True
