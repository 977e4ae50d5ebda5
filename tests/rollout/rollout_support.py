"""A hand-made ONNX model ``score`` with versions that behave well, flip or fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from factory import write_yaml
from onnx import TensorProto, helper, numpy_helper

FEATURES = 4
WEIGHTS = np.array([[0.8], [-0.5], [0.3], [0.1]], dtype=np.float32)


def score_model(weights: np.ndarray, fail_on_batches: bool = False) -> onnx.ModelProto:
    """p = sigmoid(x @ w), shape [N]; with ``fail_on_batches`` any request of 2+ rows fails."""
    nodes = []
    source = "features"
    if fail_on_batches:
        nodes.append(helper.make_node("Reshape", ["features", "one_row"], ["single"]))
        source = "single"
    nodes += [
        helper.make_node("MatMul", [source, "w"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Reshape", ["p", "flat"], ["probability"]),
    ]
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    if fail_on_batches:
        initializers.append(numpy_helper.from_array(np.array([1, FEATURES], np.int64), "one_row"))
    graph = helper.make_graph(
        nodes,
        "score",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def build_score_repo(root: Path) -> Path:
    """``score`` v1 and v2 alike, v3 flipped (1 - p, no error), v4 failing on 2-row requests."""
    write_yaml(
        root / "score" / "model.yaml",
        {
            "runtime": "onnx",
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURES]}],
            "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1]}],
            "batching": {"max_batch_size": 64, "max_queue_delay_ms": 1.0},
            "version_policy": {"all": True},
        },
    )
    versions = {
        1: score_model(WEIGHTS),
        2: score_model(WEIGHTS),
        3: score_model(-WEIGHTS),
        4: score_model(WEIGHTS, fail_on_batches=True),
    }
    for version, model in versions.items():
        folder = root / "score" / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    return root


def rows(seed: int, count: int = 2) -> list[float]:
    return (
        np.random.default_rng(seed)
        .normal(size=(count, FEATURES))
        .astype(np.float32)
        .ravel()
        .tolist()
    )


def infer_body(seed: int, count: int = 2) -> dict[str, object]:
    data = rows(seed, count)
    return {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [count, FEATURES], "data": data}
        ]
    }
