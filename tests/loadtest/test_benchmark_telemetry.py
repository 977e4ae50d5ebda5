"""The telemetry benchmark's README table: both figures, their ratios, only between its markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.benchmarks.readme import write_section
from loadtest.benchmarks.telemetry_bench import paired, readme_table


def report() -> dict[str, Any]:
    def side(rps: list[float], cpu: list[float]) -> dict[str, Any]:
        return {
            "ok_rps": sorted(rps)[1],
            "cpu_us_per_request": sorted(cpu)[1],
            "p50_ms": 6.5,
            "p99_ms": 11.0,
            "ok_rps_each": rps,
            "cpu_us_each": cpu,
        }

    on = side([9000.0, 8800.0, 9100.0], [110.0, 112.0, 109.0])
    off = side([10000.0, 9700.0, 9900.0], [100.0, 103.0, 101.0])
    return {
        "model": "fraud",
        "concurrency": 64,
        "rounds": 3,
        "duration_s": 10.0,
        "scrape_s": 5.0,
        "on": on,
        "off": off,
        "ratio": on["ok_rps"] / off["ok_rps"],
        "cpu_ratio": on["cpu_us_per_request"] / off["cpu_us_per_request"],
        "ratio_paired": paired(on["ok_rps_each"], off["ok_rps_each"]),
        "cpu_ratio_paired": paired(on["cpu_us_each"], off["cpu_us_each"]),
        "other_load_cores": 0.0,
    }


def test_paired_ratio_is_the_median_of_round_ratios() -> None:
    assert paired([9.0, 8.0, 12.0], [10.0, 10.0, 10.0]) == 0.9


def test_table_shows_both_throughputs_cpu_and_ratios_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before = "# Title\n\ntext\n\n<!-- bench:telemetry:start -->\nold\n"
    after = "<!-- bench:telemetry:end -->\n\nmore text\n"
    readme.write_text(before + after)
    write_section("telemetry", readme_table(report(), ["--write-readme"]), readme)
    text = readme.read_text()
    assert text.startswith(before.removesuffix("old\n"))
    assert text.endswith(after)
    assert "old" not in text
    assert "| on (defaults) | 9,000 | 110 µs |" in text
    assert "| off | 9,900 | 101 µs |" in text
    assert "| **on / off** | **0.91** | **1.09** |" in text
