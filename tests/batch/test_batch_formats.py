"""Every input and output format scores the same rows to the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from batch_support import feature_table, make_repo, read_table, sluice_batch, write_table

from server.batch.readers import FIRST_CHUNK_ROWS

ROWS = 3_000
FORMATS = ["parquet", "csv", "jsonl"]


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("batch-repo"))


@pytest.fixture(scope="module")
def reference(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """``linear`` scores of the Parquet input, written as Parquet."""
    folder = tmp_path_factory.mktemp("reference")
    source = write_table(feature_table(ROWS), folder / "in.parquet")
    result = sluice_batch(
        repo, "--model", "linear", "--input", str(source), "--output", str(folder / "out.parquet"),
        "--keep-columns", "id",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    return read_table(folder / "out.parquet")


@pytest.mark.parametrize("source_format", FORMATS)
@pytest.mark.parametrize("output_format", FORMATS)
def test_every_format_round_trips_to_the_same_scores(
    repo: Path, reference: pa.Table, tmp_path: Path, source_format: str, output_format: str
) -> None:
    source = write_table(feature_table(ROWS), tmp_path / f"in.{source_format}")
    output = tmp_path / f"out.{output_format}"
    result = sluice_batch(
        repo, "--model", "linear", "--input", str(source), "--output", str(output),
        "--keep-columns", "id", "--chunk-rows", "700",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    scored = read_table(output)
    assert scored.column_names == [
        "id", "label", "probabilities_0", "probabilities_1", "model_name", "model_version",
    ]  # fmt: skip
    assert scored.num_rows == ROWS
    assert [int(v) for v in scored.column("id").to_pylist()] == list(range(ROWS))
    assert scored.column("label").to_pylist() == reference.column("label").to_pylist()
    for name in ("probabilities_0", "probabilities_1"):
        got = np.asarray(scored.column(name).to_numpy(), dtype=np.float32)
        np.testing.assert_array_equal(got, reference.column(name).to_numpy())
    assert set(scored.column("model_name").to_pylist()) == {"linear"}
    assert set(scored.column("model_version").to_pylist()) == {2}


def test_output_names_the_pinned_version_and_keeps_all_columns(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(50), tmp_path / "in.parquet")
    output = tmp_path / "out.parquet"
    result = sluice_batch(
        repo, "--model", "tree:1", "--input", str(source), "--output", str(output),
        "--keep-columns", "all",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    scored = read_table(output)
    assert scored.column_names == [
        "id", "f0", "f1", "f2", "f3", "segment", "probability", "model_name", "model_version",
    ]  # fmt: skip
    assert scored.column("segment") == feature_table(50).column("segment")
    assert set(scored.column("model_version").to_pylist()) == {1}
    assert scored.schema.field("probability").type == pa.float32()


def test_format_flags_override_extensions(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(20), tmp_path / "in.csv").rename(tmp_path / "in.data")
    output = tmp_path / "scores.out"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--format", "csv",
        "--output", str(output), "--output-format", "jsonl",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert len(rows) == 20
    assert set(rows[0]) == {"probability", "model_name", "model_version"}


def test_summary_json_counts_and_names_the_version(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(1_000), tmp_path / "in.parquet")
    summary = tmp_path / "summary.json"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv"),
        "--summary", str(summary), "--chunk-rows", "300",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    doc = orjson.loads(summary.read_bytes())
    assert doc["model"] == "tree"
    assert doc["version"] == 2
    assert doc["rows"]["read"] == doc["rows"]["scored"] == 1_000
    assert doc["rows"]["skipped"] == doc["rows"]["quarantined"] == 0
    assert doc["chunks"] == 4
    assert doc["output_format"] == "csv"
    assert "read 1,000 rows, scored 1,000" in result.stderr
    assert not list(tmp_path.glob("*.sluice-*")), "temporary files left behind"


def test_a_run_from_the_top_scores_a_short_first_chunk_then_full_ones(
    repo: Path, tmp_path: Path
) -> None:
    """The first rows land after FIRST_CHUNK_ROWS; every row is still scored once, in order."""
    rows = FIRST_CHUNK_ROWS + 6_000
    source = write_table(feature_table(rows, seed=5), tmp_path / "in.parquet")
    runs = {}
    for chunk in ("8000", "9000"):  # both past the compiled trees' sizes: XGBoost scores all
        summary = tmp_path / f"summary-{chunk}.json"
        output = tmp_path / f"out-{chunk}.parquet"
        result = sluice_batch(
            repo, "--model", "tree", "--input", str(source), "--output", str(output),
            "--keep-columns", "id", "--chunk-rows", chunk, "--summary", str(summary),
        )  # fmt: skip
        assert result.code == 0, result.stderr
        runs[chunk] = (read_table(output), orjson.loads(summary.read_bytes()))
    table, doc = runs["8000"]
    assert doc["rows"]["read"] == doc["rows"]["scored"] == rows
    # 8,000-row batches of the file: the first cut at FIRST_CHUNK_ROWS, then its rest, then
    # every remaining row.
    assert doc["chunks"] == 3
    assert table.column("id").to_pylist() == list(range(rows))
    assert table.column("probability").equals(runs["9000"][0].column("probability"))
