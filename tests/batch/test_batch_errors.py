"""Mistakes a user makes are one-line errors with exit code 2, before anything is scored."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from batch_support import (
    feature_table,
    make_repo,
    sluice_batch,
    subprocess_args,
    write_table,
)


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("batch-repo"))


def assert_nothing_written(folder: Path) -> None:
    leftovers = sorted(p.name for p in folder.iterdir() if not p.name.startswith("in."))
    assert leftovers == [], leftovers


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_missing_feature_column_names_column_and_model(
    repo: Path, tmp_path: Path, suffix: str
) -> None:
    source = write_table(feature_table(10).drop_columns(["f2"]), tmp_path / f"in{suffix}")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv")
    )
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no column 'f2'" in lines[0]
    assert "model 'tree'" in lines[0]
    assert_nothing_written(tmp_path)


def test_mistyped_parquet_column_is_refused(repo: Path, tmp_path: Path) -> None:
    table = feature_table(10)
    dates = pa.array(np.arange(10).astype("datetime64[s]"))
    table = table.set_column(table.column_names.index("f1"), "f1", dates)
    source = write_table(table, tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv")
    )
    assert result.code == 2
    assert "column 'f1'" in result.stderr
    assert "timestamp" in result.stderr
    assert "model 'tree'" in result.stderr
    assert_nothing_written(tmp_path)


def test_text_column_with_no_numbers_is_a_mistyped_column(repo: Path, tmp_path: Path) -> None:
    table = feature_table(10)
    words = pa.array(["north", "south"] * 5)
    table = table.set_column(table.column_names.index("f3"), "f3", words)
    source = write_table(table, tmp_path / "in.csv")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv"),
        "--on-error", "quarantine",
    )  # fmt: skip
    assert result.code == 2
    assert "column 'f3' holds no numbers" in result.stderr
    assert "model 'tree'" in result.stderr
    assert_nothing_written(tmp_path)


def test_json_strings_in_a_feature_are_a_mistyped_column(repo: Path, tmp_path: Path) -> None:
    table = feature_table(10)
    table = table.set_column(table.column_names.index("f0"), "f0", pa.array(["1.5"] * 10))
    source = write_table(table, tmp_path / "in.jsonl")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv")
    )
    assert result.code == 2
    assert "column 'f0'" in result.stderr
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--model", "nope"], 3, "'nope' is not found"),
        (["--model", "tree:9"], 3, "version 9 is not found"),
        (["--model", "tree:x"], 2, "version must be a positive integer"),
        (["--model", "tree", "--keep-columns", "id,zz"], 2, "--keep-columns: "),
        (["--model", "tree", "--quarantine", "q.jsonl"], 2, "needs --on-error quarantine"),
        (["--model", "tree", "--resume", "--engine", "ray"], 2, "--resume applies"),
    ],
)
def test_usage_errors_exit_with_their_code(
    repo: Path, tmp_path: Path, args: list[str], code: int, expected: str
) -> None:
    source = write_table(feature_table(10), tmp_path / "in.parquet")
    result = sluice_batch(repo, "--input", str(source), "--output", str(tmp_path / "o.csv"), *args)
    assert result.code == code, result.stderr
    assert expected in result.stderr
    assert_nothing_written(tmp_path)


def test_kept_column_may_not_clash_with_an_output(repo: Path, tmp_path: Path) -> None:
    table = feature_table(10).append_column("model_name", pa.array(["x"] * 10))
    source = write_table(table, tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv"),
        "--keep-columns", "all",
    )  # fmt: skip
    assert result.code == 2
    assert "'model_name' would clash with an output column" in result.stderr


def test_unknown_extension_asks_for_format(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(10), tmp_path / "in.csv").rename(tmp_path / "in.txt")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv")
    )
    assert result.code == 2
    assert "pass --format" in result.stderr


def test_no_traceback_for_user_mistakes(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(10).drop_columns(["f0"]), tmp_path / "in.csv")
    args = ["--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv")]
    process = subprocess.run(
        subprocess_args(repo, *args), capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("sluice batch: error: ")
