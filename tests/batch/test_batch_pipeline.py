"""The local engine's pipeline: how a file is cut into chunks and slices never shows."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from batch_support import (
    feature_table,
    make_repo,
    read_table,
    sluice_batch,
    subprocess_args,
    write_table,
)

from server.batch.engine_local import MIN_SLICE_ROWS, slice_bounds

ROWS = 30_000


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("pipeline-repo"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(feature_table(ROWS, seed=5), tmp_path_factory.mktemp("in") / "in.parquet")


@pytest.mark.parametrize("model", ["tree", "linear"])
def test_chunks_and_threads_do_not_change_a_single_value(
    repo: Path, source: Path, tmp_path: Path, model: str
) -> None:
    outputs = {}
    # One chunk on one thread; then 4 chunks of 9,000 rows, each scored as two slices on
    # three threads, the last one (3,000 rows) whole.
    for name, chunk, threads in (("whole", "30000", "1"), ("sliced", "9000", "3")):
        outputs[name] = tmp_path / f"{name}.parquet"
        result = sluice_batch(
            repo, "--model", model, "--input", str(source), "--output", str(outputs[name]),
            "--keep-columns", "id", "--chunk-rows", chunk, "--inference-threads", threads,
        )  # fmt: skip
        assert result.code == 0, result.stderr
    whole, sliced = read_table(outputs["whole"]), read_table(outputs["sliced"])
    assert sliced.column("id").to_pylist() == list(range(ROWS))
    assert sliced.equals(whole)


def test_slices_cover_every_row_once_in_order() -> None:
    for rows in (0, 1, MIN_SLICE_ROWS, 2 * MIN_SLICE_ROWS - 1, 2 * MIN_SLICE_ROWS, 65_536, 65_537):
        for parts in (1, 2, 3, 8):
            bounds = slice_bounds(rows, parts)
            assert bounds[0][0] == 0
            assert bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert len(bounds) <= parts
            assert len(bounds) == 1 or min(b - a for a, b in bounds) >= MIN_SLICE_ROWS


def test_summary_says_when_the_first_rows_were_written(
    repo: Path, source: Path, tmp_path: Path
) -> None:
    summary = tmp_path / "summary.json"
    command = subprocess_args(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.parquet"),
        "--chunk-rows", "5000", "--summary", str(summary),
    )  # fmt: skip
    before = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    after = time.time()
    assert result.returncode == 0, result.stderr
    first = orjson.loads(summary.read_bytes())["first_rows_at"]
    assert before < first < after
