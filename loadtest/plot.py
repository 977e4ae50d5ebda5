"""PNG plots of sweep results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from loadtest.sweep import SweepResult


def plot_sweep(sweep: SweepResult, path: Path, title: str = "") -> None:
    """p50/p90/p99 latency against achieved throughput, one point per step, with the SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in sweep.steps if s.result.latency.count]
    x = [s.result.ok_rps for s in steps]
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for label, values in (
            ("p50", [s.result.latency.p50_ms for s in steps]),
            ("p90", [s.result.latency.p90_ms for s in steps]),
            ("p99", [s.result.latency.p99_ms for s in steps]),
        ):
            ax.plot(x, values, marker="o", label=label)
        ax.axhline(sweep.plan.slo_p99_ms, color="red", linestyle="--", label="p99 SLO")
        best = sweep.best
        if best is not None:
            ax.axvline(best.result.ok_rps, color="grey", linestyle=":", label="max rate within SLO")
        ax.set_yscale("log")
        ax.set_xlabel("achieved throughput (2xx responses/s)")
        ax.set_ylabel("latency from intended send time (ms)")
        ax.set_title(title or "latency vs throughput")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
