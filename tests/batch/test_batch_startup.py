"""``sluice batch`` loads only the model it scores, and skips converting trees it won't use."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from batch_support import feature_table, make_repo, subprocess_args, write_table


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("startup-repo"))


def sluice_batch(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it; its log (stderr) is what these tests read."""
    command = subprocess_args(repo, *args, "--log-level", "info")
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_only_the_scored_model_is_loaded(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "out.parquet"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model tree version" in result.stderr
    assert "model linear" not in result.stderr


def test_large_chunks_skip_the_compiled_trees_and_small_ones_keep_them(
    repo: Path, tmp_path: Path
) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    runs = {}
    for chunk in ("65536", "10"):
        runs[chunk] = sluice_batch(
            repo, "--model", "tree", "--input", str(source),
            "--output", str(tmp_path / f"out-{chunk}.parquet"), "--chunk-rows", chunk,
        )  # fmt: skip
        assert runs[chunk].returncode == 0, runs[chunk].stderr
    assert "executors compiled" not in runs["65536"].stderr
    assert "executors compiled" in runs["10"].stderr
