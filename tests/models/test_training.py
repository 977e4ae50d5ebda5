"""The example models' training code: reproducible, true to model.yaml, and loadable.

Each build runs the real entry point (``python -m models.train``) in a
subprocess, into a temporary repository holding copies of the committed
model.yaml files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = {"fraud": "model.ubj", "churn": "model.onnx"}
VERSIONS = (1, 2)
EPOCH = 1_700_000_000
BUILT_FILES = ("holdout.parquet", "reference.json", "card.yaml")
PAIRS = [(model, version) for model in ARTIFACTS for version in VERSIONS]


@dataclass(frozen=True)
class Build:
    repo: Path
    stdout: str


def feature_names(model: str) -> list[str]:
    doc = yaml.safe_load((ROOT / "models" / model / "model.yaml").read_text())
    return [str(name) for name in doc["inputs"][0]["feature_names"]]


def train(repo: Path, *args: str, hash_seed: int = 1) -> subprocess.CompletedProcess[str]:
    for model in ARTIFACTS:
        target = repo / model / "model.yaml"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "models" / model / "model.yaml", target)
    return subprocess.run(
        [sys.executable, "-m", "models.train", "--repository", str(repo), *args],
        cwd=ROOT,
        # Each build gets its own string-hash seed, as two separate machines would.
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH), "PYTHONHASHSEED": str(hash_seed)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def build(repo: Path, hash_seed: int) -> Build:
    done = train(repo, hash_seed=hash_seed)
    assert done.returncode == 0, done.stderr
    return Build(repo, done.stdout)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return build(tmp_path_factory.mktemp("first"), hash_seed=1)


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return build(tmp_path_factory.mktemp("second"), hash_seed=2)


def folder(build: Build, model: str, version: int) -> Path:
    return build.repo / model / str(version)


def card(build: Build, model: str, version: int) -> dict[str, Any]:
    loaded = yaml.safe_load((folder(build, model, version) / "card.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def holdout(build: Build, model: str, version: int) -> pa.Table:
    return pq.read_table(folder(build, model, version) / "holdout.parquet")


def holdout_matrix(table: pa.Table, model: str) -> np.ndarray:
    return np.column_stack([table[name].to_numpy() for name in feature_names(model)])


def test_prints_one_line_per_version_built(first: Build) -> None:
    lines = first.stdout.strip().splitlines()
    assert len(lines) == len(PAIRS)
    for line, (model, version) in zip(lines, PAIRS, strict=True):
        assert line.startswith(f"{model} v{version}: auc=")
        assert str(folder(first, model, version)) in line


@pytest.mark.parametrize(("model", "version"), PAIRS)
def test_training_twice_gives_identical_bytes(
    first: Build, second: Build, model: str, version: int
) -> None:
    # With SOURCE_DATE_EPOCH pinned even the card, which records trained_at, must match.
    for name in (ARTIFACTS[model], *BUILT_FILES):
        a = (folder(first, model, version) / name).read_bytes()
        b = (folder(second, model, version) / name).read_bytes()
        assert a == b, f"{model}/{version}/{name} differs between two builds"


@pytest.mark.parametrize(("model", "version"), PAIRS)
def test_files_follow_model_yaml_feature_order(first: Build, model: str, version: int) -> None:
    names = feature_names(model)
    table = holdout(first, model, version)
    assert table.column_names == [*names, "label"]
    assert all(table.schema.field(n).type == pa.float32() for n in names)
    assert set(np.unique(table["label"].to_numpy())) == {0, 1}
    assert table.num_rows == card(first, model, version)["data"]["rows"]["holdout"]

    reference = json.loads((folder(first, model, version) / "reference.json").read_text())
    assert reference["schema_version"] == 1
    assert (reference["model"], reference["version"]) == (model, version)
    assert list(reference["features"]) == names
    for name, profile in [*reference["features"].items(), *reference["predictions"].items()]:
        if profile["kind"] == "numeric":
            edges, fractions = profile["bin_edges"], profile["bin_fractions"]
            assert all(a < b for a, b in pairwise(edges)), name
            assert len(fractions) == len(edges) + 1, name
        else:
            assert profile["kind"] == "categorical", name
            fractions = profile["fractions"]
            assert len(fractions) == len(profile["categories"]), name
        assert math.isclose(sum(fractions), 1.0, abs_tol=1e-9), name


def test_reference_profiles_flags_as_categories_and_predictions_by_column(first: Build) -> None:
    fraud = json.loads((folder(first, "fraud", 1) / "reference.json").read_text())
    assert fraud["features"]["is_online"]["categories"] == ["0", "1"]
    assert fraud["features"]["amount"]["kind"] == "numeric"
    assert list(fraud["predictions"]) == ["probability"]
    assert fraud["predictions"]["probability"]["column"] is None

    churn = json.loads((folder(first, "churn", 2) / "reference.json").read_text())
    assert churn["features"]["contract_months"]["categories"] == ["1", "12", "24"]
    assert list(churn["predictions"]) == ["probabilities"]
    assert churn["predictions"]["probabilities"]["column"] == 1


@pytest.mark.parametrize(("model", "version"), PAIRS)
def test_card_records_metrics_and_digests(first: Build, model: str, version: int) -> None:
    doc = card(first, model, version)
    base = folder(first, model, version)
    assert (doc["model"], doc["version"]) == (model, version)
    assert doc["features"] == feature_names(model)
    metrics = doc["metrics"]["holdout"]
    assert metrics["auc"] > 0.75
    assert 0 < metrics["log_loss"] < math.log(2)
    assert 0.5 < metrics["accuracy"] <= 1
    assert 0 < metrics["positive_rate"] < 0.5
    artifact = doc["artifact"]
    assert artifact["file"] == ARTIFACTS[model]
    assert artifact["sha256"] == hashlib.sha256((base / artifact["file"]).read_bytes()).hexdigest()
    for name, digest in doc["files"].items():
        assert digest == hashlib.sha256((base / name).read_bytes()).hexdigest()
    assert doc["trained_at"] == "2023-11-14T22:13:20Z"
    assert doc["approved_by"] is None
    assert len(doc["data"]["sha256"]) == 64


def test_versions_differ_but_share_the_data(first: Build) -> None:
    for model in ARTIFACTS:
        one, two = card(first, model, 1), card(first, model, 2)
        assert one["hyperparameters"] != two["hyperparameters"]
        assert one["data"]["sha256"] == two["data"]["sha256"]
        assert one["artifact"]["sha256"] != two["artifact"]["sha256"]


@pytest.mark.parametrize("version", VERSIONS)
def test_onnx_model_serves_label_and_probabilities(first: Build, version: int) -> None:
    import onnxruntime as ort
    from sklearn.metrics import roc_auc_score

    session = ort.InferenceSession(
        str(folder(first, "churn", version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert session.get_inputs()[0].shape[1] == len(feature_names("churn"))
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]

    table = holdout(first, "churn", version)
    label, probabilities = session.run(None, {"features": holdout_matrix(table, "churn")})
    assert label.dtype == np.int64
    assert label.shape == (table.num_rows,)
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (table.num_rows, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    auc = roc_auc_score(table["label"].to_numpy(), probabilities[:, 1])
    assert auc == pytest.approx(
        card(first, "churn", version)["metrics"]["holdout"]["auc"], abs=1e-5
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_xgboost_model_predicts_probabilities(first: Build, version: int) -> None:
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    booster = xgb.Booster(model_file=str(folder(first, "fraud", version) / "model.ubj"))
    assert booster.feature_names == feature_names("fraud")
    table = holdout(first, "fraud", version)
    scores = booster.inplace_predict(holdout_matrix(table, "fraud"))
    assert scores.shape == (table.num_rows,)
    assert np.all((scores >= 0) & (scores <= 1))
    auc = roc_auc_score(table["label"].to_numpy(), scores)
    assert auc == pytest.approx(
        card(first, "fraud", version)["metrics"]["holdout"]["auc"], abs=1e-5
    )


def test_rebuild_replaces_an_existing_version(tmp_path: Path) -> None:
    assert train(tmp_path, "--model", "churn", "--version", "1").returncode == 0
    version = tmp_path / "churn" / "1"
    before = (version / "model.onnx").read_bytes()
    (version / "stale.txt").write_text("left by an older build")

    done = train(tmp_path, "--model", "churn", "--version", "1")

    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "churn").iterdir()) == ["1", "model.yaml"]
    assert sorted(p.name for p in version.iterdir()) == sorted(("model.onnx", *BUILT_FILES))
    assert (version / "model.onnx").read_bytes() == before


def test_unknown_version_is_an_error(tmp_path: Path) -> None:
    done = train(tmp_path, "--model", "fraud", "--version", "9")
    assert done.returncode == 2
    assert "version 9" in done.stderr
    assert not (tmp_path / "fraud" / "9").exists()
