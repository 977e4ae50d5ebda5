"""The batch benchmark's contest runs both contenders for real and writes its table in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from loadtest.benchmarks import batch_bench
from loadtest.benchmarks.readme import write_section


def test_contest_compares_both_contenders_on_the_same_rows(
    example_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    (repo / "fraud").mkdir(parents=True)
    shutil.copy(example_repo / "fraud" / "model.yaml", repo / "fraud")
    shutil.copytree(example_repo / "fraud" / "2", repo / "fraud" / "2")
    report = tmp_path / "report.json"
    code = batch_bench.main(
        [
            "--model-repository", str(repo), "--rows", "", "--contest-rows", "20000",
            "--rounds", "2", "--threads", "2", "--json", str(report),
        ]
    )  # fmt: skip
    assert code == 0
    contest = orjson.loads(report.read_bytes())["contest"]
    assert contest["rows"] == 20_000
    assert len(contest["sluice_wall_s"]) == len(contest["script_wall_s"]) == 2
    # The first row is out after the spawn and before the process has exited.
    for first, wall in zip(contest["sluice_first_row_s"], contest["sluice_wall_s"], strict=True):
        assert 0 < first < wall


def test_readme_table_goes_between_the_markers_only(tmp_path: Path) -> None:
    contest = batch_bench.Contest(
        rows=1_000_000,
        rounds=2,
        sluice_wall_s=[2.0, 2.2],
        script_wall_s=[2.5, 2.6],
        sluice_first_row_s=[0.6, 0.7],
        load=[0.3, 0.5],
    )
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:batch:start -->\nold\n<!-- bench:batch:end -->\nafter\n")
    table = batch_bench.readme_table([], 500_000.0, 65_536, 2, ["--write-readme"], contest)
    write_section("batch", table, readme)
    text = readme.read_text()
    assert text.startswith("before\n<!-- bench:batch:start -->\nOn 1,000,000 rows")
    assert text.endswith("<!-- bench:batch:end -->\nafter\n")
    assert "| `sluice batch` | 2.10 s (2.00 s) | 0.65 s (0.60 s) |" in text
    assert "| Sluice / script, per round | 0.82 (0.80-0.85) | |" in text
    assert "old" not in text
