"""The workers benchmark: CPU summed over a process and its children; the README table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.benchmarks.readme import write_section
from loadtest.benchmarks.workers_bench import children, cpu_s, readme_table


def test_children_are_found_and_a_gone_process_costs_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert child.pid in children(os.getpid())
    finally:
        child.communicate(b"")
    assert cpu_s(child.pid) == 0.0


def _arm(workers: int, clients: int, rps: float, cpu: float) -> dict[str, Any]:
    return {
        "workers": workers,
        "clients": clients,
        "ok_rps": rps,
        "cpu_us_per_request": cpu,
        "batch_rows": 30.0 / workers,
        "p99_ms": 12.0,
        "worker_rss_mib": [300.0] * workers,
    }


def test_table_has_every_arm_and_its_ratios_between_the_markers(tmp_path: Path) -> None:
    pinned = {
        "arms": [
            _arm(1, 64, 10_000.0, 100.0),
            _arm(2, 64, 9_500.0, 110.0),
            _arm(2, 128, 9_900.0, 102.0),
        ],
        "rps_ratio": [1.0, 0.95, 0.99],
        "cpu_ratio": [1.0, 1.1, 1.02],
        "other_load_cores": 0.1,
    }
    shared = {
        "arms": [_arm(1, 64, 10_000.0, 100.0), _arm(2, 64, 15_000.0, 104.0)],
        "rps_ratio": [1.0, 1.5],
        "cpu_ratio": [1.0, 1.04],
        "other_load_cores": 0.2,
    }
    report = {
        "cpus": [0, 1],
        "model": "fraud",
        "concurrency": 64,
        "rounds": 5,
        "duration_s": 10.0,
        "pinned_note": "every server process on CPU 1, the load generator on CPU 0",
        "layouts": {"pinned": pinned, "shared": shared},
    }
    readme = tmp_path / "README.md"
    readme.write_text("# T\n<!-- bench:workers:start -->\nold\n<!-- bench:workers:end -->\nend\n")
    write_section("workers", readme_table(report, ["--write-readme"]), readme)
    text = readme.read_text()
    assert "old" not in text
    assert text.endswith("<!-- bench:workers:end -->\nend\n")
    assert "| pinned | 1 | 64 | 10,000 | 100 µs | 30.0 | 12.00 ms | 300 MiB |  |" in text
    assert (
        "| pinned | 2 | 128 | 9,900 | 102 µs | 15.0 | 12.00 ms | 300 MiB | **0.99**, **1.02** |"
        in text
    )
    assert (
        "| shared | 2 | 64 | 15,000 | 104 µs | 15.0 | 12.00 ms | 300 MiB | **1.50**, **1.04** |"
        in text
    )
