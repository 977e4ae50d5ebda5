"""Small real models for tests: trained in a second from seeded random data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

FEATURES = 4


def _data(seed: int, rows: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + rng.normal(scale=0.3, size=rows) > 0).astype(np.int64)
    return x, y


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def xgboost_config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "runtime": "xgboost",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [-1, FEATURES],
                "feature_names": [f"f{i}" for i in range(FEATURES)],
            }
        ],
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1]}],
        "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2.0},
        "version_policy": {"all": True},
    }
    doc.update(overrides)
    return doc


def onnx_config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "runtime": "onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
        "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2.0},
        "version_policy": {"all": True},
    }
    doc.update(overrides)
    return doc


def train_xgboost(path: Path, seed: int = 0, trees: int = 8) -> None:
    import xgboost as xgb

    x, y = _data(seed)
    dtrain = xgb.DMatrix(x, label=y, feature_names=[f"f{i}" for i in range(FEATURES)])
    params = {"objective": "binary:logistic", "max_depth": 3, "seed": seed, "nthread": 1}
    booster = xgb.train(params, dtrain, num_boost_round=trees)
    path.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path / "model.ubj"))


def train_onnx(path: Path, seed: int = 0) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _data(seed)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(random_state=seed))
    pipeline.fit(x, y)
    onx = to_onnx(
        pipeline,
        x[:1],
        options={"zipmap": False},
        initial_types=None,
        target_opset=17,
        final_types=None,
    )
    onx.graph.input[0].name = "features"
    for node in onx.graph.node:
        node.input[:] = ["features" if i == "X" else i for i in node.input]
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(onx.SerializeToString())


def build_repository(root: Path) -> Path:
    """Two models (xgboost ``tree``, onnx ``linear``), two versions each."""
    write_yaml(root / "tree" / "model.yaml", xgboost_config())
    write_yaml(root / "linear" / "model.yaml", onnx_config())
    for version in (1, 2):
        train_xgboost(root / "tree" / str(version), seed=version, trees=4 * version)
        train_onnx(root / "linear" / str(version), seed=version)
    return root
