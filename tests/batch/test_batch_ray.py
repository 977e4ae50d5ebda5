"""The Ray engine gives the local engine's output, through Ray Data actors on a real Ray."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # the ray extra is part of dev: a missing Ray fails here, it is never skipped
from batch_support import feature_table, make_repo, read_jsonl, read_table, sluice_batch
from batch_support import write_table as write_input

from server.batch.engine_ray import RayScorer
from server.batch.job import BatchJob, Format
from server.batch.session import resolve_plan
from server.config import Settings

ROWS = 2_000


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("batch-repo"))


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One small local Ray for the module; the engine joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def by_id(table: pa.Table) -> pa.Table:
    ids = pa.array([int(v) for v in table.column("id").to_pylist()], pa.int64())
    return table.set_column(0, "id", ids).sort_by("id")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_ray_output_equals_local_output(repo: Path, tmp_path: Path, fmt: str) -> None:
    source = write_input(feature_table(ROWS, seed=5), tmp_path / f"in.{fmt}")
    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = ["--model", "linear", "--input", str(source), "--keep-columns", "id",
              "--chunk-rows", "500"]  # fmt: skip
    assert sluice_batch(repo, *common, "--output", str(local)).code == 0
    result = sluice_batch(
        repo, *common, "--output", str(distributed), "--engine", "ray", "--ray-actors", "1",
        "--summary", str(tmp_path / "summary.json"),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert distributed.is_dir()
    assert by_id(read_table(distributed)).equals(by_id(read_table(local)))
    doc = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert doc["engine"] == "ray"
    assert doc["rows"]["read"] == doc["rows"]["scored"] == ROWS


def test_ray_quarantines_bad_rows_and_counts_add_up(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    with source.open("wb") as handle:
        for row in feature_table(100).to_pylist():
            if row["id"] in (10, 60):
                row["f1"] = None
            handle.write(orjson.dumps(row) + b"\n")
        handle.write(b"{broken\n")
    output, summary = tmp_path / "out", tmp_path / "summary.json"
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(output),
        "--output-format", "parquet", "--keep-columns", "id", "--engine", "ray",
        "--on-error", "quarantine", "--summary", str(summary),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = orjson.loads(summary.read_bytes())["rows"]
    assert rows == {**rows, "read": 101, "scored": 98, "quarantined": 3, "skipped": 0}
    assert set(read_table(output).column("id").to_pylist()) == set(range(100)) - {10, 60}
    quarantined = read_jsonl(Path(f"{output}.quarantine.jsonl"))
    reasons = sorted(str(q["_error"]) for q in quarantined)
    assert reasons[0] == "missing value in column 'f1'"
    assert reasons[1] == "missing value in column 'f1'"
    assert reasons[2].startswith("not valid JSON")


def test_ray_fail_mode_reports_the_bad_row_without_ray_noise(repo: Path, tmp_path: Path) -> None:
    table = feature_table(50)
    f2 = table.column("f2").to_pylist()
    f2[7] = float("inf")
    source = write_input(table.set_column(3, "f2", pa.array(f2)), tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "out"),
        "--output-format", "parquet", "--engine", "ray",
    )  # fmt: skip
    assert result.code == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("sluice batch: error: ")
    assert "non-finite value inf in column 'f2'" in message
    assert not (tmp_path / "out").exists()


def inference_threads() -> set[int | None]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("sluice-infer")}


def test_a_scorer_closed_in_process_releases_its_core(repo: Path, tmp_path: Path) -> None:
    source = write_input(feature_table(20), tmp_path / "in.parquet")
    job = BatchJob(
        Settings(model_repository=repo), "linear", None, source, tmp_path / "out",
        Format.PARQUET, Format.PARQUET,
    )  # fmt: skip
    plan, sha256, schema = asyncio.run(resolve_plan(job))
    before = inference_threads()
    scorer = RayScorer(job, plan.version, sha256, schema)
    assert scorer(pq.read_table(source, columns=plan.read_columns)).num_rows == 20
    assert inference_threads() - before, "the scorer's core has its own inference thread"
    scorer.close()
    assert inference_threads() <= before
    scorer.close()  # a second close is harmless
