"""``--drift-report``: the scored file's drift against the version's reference profile."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
from batch_support import FEATURE_NAMES, feature_table, make_repo, sluice_batch, write_table

from server.core.monitoring.reference import build_reference


def with_reference(tiny_repo: Path, root: Path) -> Path:
    """The batch repository, with a reference profile for ``tree`` v2 from N(0, 1) features."""
    repo = make_repo(tiny_repo, root)
    reference = feature_table(5_000, seed=1)
    features = {n: reference.column(n).to_numpy() for n in FEATURE_NAMES}
    doc = build_reference("tree", 2, features, {})
    (repo / "tree" / "2" / "reference.json").write_bytes(orjson.dumps(doc))
    return repo


def test_drift_report_flags_a_shifted_feature(tiny_repo: Path, tmp_path: Path) -> None:
    repo = with_reference(tiny_repo, tmp_path / "repo")
    table = feature_table(5_000, seed=2)
    shifted = table.column("f2").to_numpy() + 3.0
    table = table.set_column(3, "f2", pa.array(shifted))
    source = write_table(table, tmp_path / "in.parquet")
    report, summary = tmp_path / "drift.json", tmp_path / "summary.json"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.parquet"),
        "--drift-report", str(report), "--summary", str(summary), "--chunk-rows", "1000",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    doc = orjson.loads(report.read_bytes())
    assert doc["model"] == "tree"
    assert doc["version"] == "2"
    assert doc["window"]["rows"] == 5_000
    headline = orjson.loads(summary.read_bytes())["reports"]["drift"]
    assert headline["rows"] == 5_000
    assert headline["drifted_features"] == ["f2"], headline


def test_drift_report_without_a_reference_is_a_usage_error(tiny_repo: Path, tmp_path: Path) -> None:
    repo = make_repo(tiny_repo, tmp_path / "repo")
    source = write_table(feature_table(10), tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "o.parquet"),
        "--drift-report", str(tmp_path / "drift.json"),
    )  # fmt: skip
    assert result.code == 2
    assert "no usable reference profile" in result.stderr
    assert not (tmp_path / "o.parquet").exists()
