"""Bad rows stop the run, are skipped, or are quarantined with their reason; counts add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from batch_support import (
    feature_table,
    make_repo,
    read_jsonl,
    read_table,
    sluice_batch,
    write_table,
)

ROWS = 40


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("batch-repo"))


def bad_csv(path: Path) -> Path:
    """Rows with ids 3 (unparsable), 5 (missing), 8 (inf); a malformed line after id 10."""
    lines = ["id,f0,f1,f2,f3"]
    for row in feature_table(ROWS).select(["id", "f0", "f1", "f2", "f3"]).to_pylist():
        values = [str(row["id"])] + [repr(row[f"f{i}"]) for i in range(4)]
        if row["id"] == 3:
            values[2] = "oops"
        if row["id"] == 5:
            values[3] = ""
        if row["id"] == 8:
            values[4] = "inf"
        lines.append(",".join(values))
        if row["id"] == 10:
            lines.append("1,2,3")
    path.write_text("\n".join(lines) + "\n")
    return path


def bad_parquet(path: Path) -> Path:
    """NaN in f0 at ids 2 and 7, a null in f1 at id 4."""
    table = feature_table(ROWS)
    f0 = table.column("f0").to_numpy().copy()
    f0[[2, 7]] = np.nan
    f1 = table.column("f1").to_pylist()
    f1[4] = None
    table = table.set_column(1, "f0", pa.array(f0)).set_column(2, "f1", pa.array(f1))
    return write_table(table, path)


def bad_jsonl(path: Path) -> Path:
    """A string at id 1, a missing key at id 6, and an invalid line after id 9."""
    with path.open("wb") as handle:
        for row in feature_table(ROWS).to_pylist():
            if row["id"] == 1:
                row["f3"] = "high"
            if row["id"] == 6:
                del row["f2"]
            handle.write(orjson.dumps(row) + b"\n")
            if row["id"] == 9:
                handle.write(b'{"id": 99, "f0": \n')
    return path


CASES = {
    "csv": (bad_csv, 41, {3: "unparsable value 'oops' in column 'f1'", 5: "missing value in column 'f2'", 8: "non-finite value inf in column 'f3'"}, 1),  # noqa: E501
    "parquet": (bad_parquet, 40, {2: "non-finite value nan in column 'f0'", 4: "missing value in column 'f1'", 7: "non-finite value nan in column 'f0'"}, 0),  # noqa: E501
    "jsonl": (bad_jsonl, 41, {1: "unparsable value 'high' in column 'f3'", 6: "missing value in column 'f2'"}, 1),  # noqa: E501
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_quarantine_holds_each_bad_row_with_its_reason(
    repo: Path, tmp_path: Path, fmt: str
) -> None:
    make, read, bad_ids, malformed = CASES[fmt]
    source = make(tmp_path / f"in.{fmt}")
    output = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(output),
        "--keep-columns", "id", "--on-error", "quarantine", "--summary", str(summary),
        "--chunk-rows", "16",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = orjson.loads(summary.read_bytes())["rows"]
    assert rows["read"] == read
    assert rows["quarantined"] == len(bad_ids) + malformed
    assert rows["skipped"] == 0
    assert rows["read"] == rows["scored"] + rows["skipped"] + rows["quarantined"]

    scored_ids = {int(i) for i in read_table(output).column("id").to_pylist()}
    assert scored_ids == set(range(ROWS)) - set(bad_ids)

    quarantined = read_jsonl(Path(f"{output}.quarantine.jsonl"))
    assert len(quarantined) == rows["quarantined"]
    by_id = {int(str(q["id"])): q for q in quarantined if "id" in q and q["id"] != 99}
    assert sorted(by_id) == sorted(bad_ids)
    for row_id, reason in bad_ids.items():
        assert reason in str(by_id[row_id]["_error"])
    if malformed:
        broken = [q for q in quarantined if "_raw" in q]
        assert len(broken) == 1
        assert "malformed" in str(broken[0]["_error"]) or "not valid JSON" in str(
            broken[0]["_error"]
        )


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_skip_counts_bad_rows_and_writes_no_side_file(repo: Path, tmp_path: Path, fmt: str) -> None:
    make, read, bad_ids, malformed = CASES[fmt]
    source = make(tmp_path / f"in.{fmt}")
    output = tmp_path / "out.csv"
    summary = tmp_path / "summary.json"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(output),
        "--on-error", "skip", "--summary", str(summary),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = orjson.loads(summary.read_bytes())["rows"]
    assert rows["skipped"] == len(bad_ids) + malformed
    assert rows["scored"] == ROWS - len(bad_ids)
    assert rows["read"] == rows["scored"] + rows["skipped"] + rows["quarantined"] == read
    assert read_table(output).num_rows == rows["scored"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [source.name, "out.csv", "summary.json"]
    )


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_fail_stops_at_the_first_bad_row_and_writes_nothing(
    repo: Path, tmp_path: Path, fmt: str
) -> None:
    make, _, bad_ids, _ = CASES[fmt]
    source = make(tmp_path / f"in.{fmt}")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.csv"),
        "--chunk-rows", "16",
    )  # fmt: skip
    assert result.code == 2
    first = min(bad_ids)
    assert f"row {first}: {bad_ids[first]}" in result.stderr
    assert "--on-error fail" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_nonfinite_values_pass_when_the_model_allows_them(tiny_repo: Path, tmp_path: Path) -> None:
    import yaml

    repo = make_repo(tiny_repo, tmp_path / "repo")
    config_path = repo / "tree" / "model.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["inputs"][0]["allow_nonfinite"] = True
    config_path.write_text(yaml.safe_dump(config))
    source = bad_parquet(tmp_path / "in.parquet")
    output = tmp_path / "out.parquet"
    result = sluice_batch(repo, "--model", "tree", "--input", str(source), "--output", str(output))
    assert result.code == 0, result.stderr
    assert read_table(output).num_rows == ROWS
