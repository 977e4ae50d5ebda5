"""One contract, every runtime: what a Runtime must do whatever the backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from factory import FEATURES, onnx_config, train_onnx, train_xgboost, xgboost_config

from server.core.model_config import ModelConfig
from server.core.runtimes import RUNTIMES, Runtime, RuntimeKind, SignatureMismatch

CASES: dict[str, tuple[RuntimeKind, Callable[[Path], None], dict[str, object], str]] = {
    "xgboost": (RuntimeKind.XGBOOST, train_xgboost, xgboost_config(), "model.ubj"),
    "onnx": (RuntimeKind.ONNX, train_onnx, onnx_config(), "model.onnx"),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    kind, train, doc, artifact = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    train(folder)
    config = ModelConfig.model_validate(doc)
    runtime = RUNTIMES[kind](folder / artifact, config.signature(), {})
    return runtime, config, folder / artifact, kind


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def test_outputs_match_declared_signature(
    loaded: tuple[Runtime, ModelConfig, Path, RuntimeKind],
) -> None:
    runtime, config, _, _ = loaded
    out = runtime.predict({"features": batch(5)})
    for spec in config.signature().outputs:
        assert spec.name in out
        assert out[spec.name].shape[0] == 5
        assert list(out[spec.name].shape[1:]) == list(spec.shape[1:])


def test_rows_are_independent_of_batch_composition(
    loaded: tuple[Runtime, ModelConfig, Path, RuntimeKind],
) -> None:
    runtime, _, _, _ = loaded
    x = batch(40, seed=3)
    together = runtime.predict({"features": x})
    for i in (0, 17, 39):
        alone = runtime.predict({"features": x[i : i + 1]})
        for name, value in alone.items():
            np.testing.assert_allclose(value[0], together[name][i], rtol=1e-6)


def test_predictions_are_deterministic(
    loaded: tuple[Runtime, ModelConfig, Path, RuntimeKind],
) -> None:
    runtime, _, _, _ = loaded
    x = batch(8, seed=5)
    first, second = runtime.predict({"features": x}), runtime.predict({"features": x})
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_declared_feature_count_must_match_artifact(
    loaded: tuple[Runtime, ModelConfig, Path, RuntimeKind],
) -> None:
    _, config, artifact, kind = loaded
    doc = config.model_dump(mode="json")
    doc["inputs"][0]["shape"] = [-1, FEATURES + 1]
    doc["inputs"][0]["feature_names"] = []
    wrong = ModelConfig.model_validate(doc)
    with pytest.raises(SignatureMismatch):
        RUNTIMES[kind](artifact, wrong.signature(), {})


def test_unknown_runtime_option_is_rejected(
    loaded: tuple[Runtime, ModelConfig, Path, RuntimeKind],
) -> None:
    _, config, artifact, kind = loaded
    with pytest.raises(SignatureMismatch, match="unknown"):
        RUNTIMES[kind](artifact, config.signature(), {"no_such_option": 1})
