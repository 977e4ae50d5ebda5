"""Progress: a bar on a terminal, log lines with rows, rows/s and ETA otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from batch_support import feature_table, make_repo, sluice_batch, write_table

from server.batch.progress import BarProgress, LogProgress, NoProgress, make_progress


def test_log_lines_when_stderr_is_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    progress = make_progress("fraud in.parquet", None)
    assert isinstance(progress, LogProgress)
    assert isinstance(make_progress("x", False), NoProgress)
    every_update = LogProgress(every_s=0)
    with caplog.at_level(logging.INFO, logger="sluice.batch"):
        every_update.update(1_000, 0.25)
        every_update.update(250_000, 0.5)
    line = caplog.records[-1].getMessage()
    assert line.startswith("read 250,000 rows (50%), ")
    assert " rows/s" in line
    assert "ETA" in line


def test_forced_bar_runs_to_completion(tiny_repo: Path, tmp_path: Path) -> None:
    repo = make_repo(tiny_repo, tmp_path / "repo")
    source = write_table(feature_table(2_000), tmp_path / "in.parquet")
    argv = ["--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.parquet")]
    result = sluice_batch(repo, *argv, "--progress", "--chunk-rows", "500")
    assert result.code == 0, result.stderr
    assert "2,000 rows" in result.stderr
    assert isinstance(make_progress("x", True), BarProgress)
