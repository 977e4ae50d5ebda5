"""The XGBoost runtime's dense C-API path answers exactly what ``Booster.inplace_predict`` does."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from factory import FEATURES, train_xgboost, xgboost_config

from server.core.model_config import ModelConfig
from server.core.runtimes.xgboost import XGBoostRuntime


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("xgb")
    train_xgboost(folder, trees=40)
    return folder / "model.ubj"


def runtime(artifact: Path, **options: object) -> XGBoostRuntime:
    config = ModelConfig.model_validate(xgboost_config())
    return XGBoostRuntime(artifact, config.signature(), options)


def rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)
    if n > 3:
        x[3, 1] = np.nan  # missing value: XGBoost's default branch
    return x


@pytest.mark.parametrize("n", [1, 2, 7, 300])
@pytest.mark.parametrize("output", ["probability", "margin"])
def test_same_answers_as_inplace_predict(artifact: Path, n: int, output: str) -> None:
    booster = xgb.Booster(model_file=str(artifact))
    predict_type = "margin" if output == "margin" else "value"
    x = rows(n, seed=n)
    expected = booster.inplace_predict(x, predict_type=predict_type)
    got = runtime(artifact, output=output).predict({"features": x})["probability"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_float64_and_non_contiguous_rows_answer_the_same(artifact: Path) -> None:
    booster = xgb.Booster(model_file=str(artifact))
    x = rows(50, seed=4)
    model = runtime(artifact)
    wide = np.asfortranarray(x)  # not C-contiguous: the public method serves it
    np.testing.assert_array_equal(
        model.predict({"features": wide})["probability"], booster.inplace_predict(x)
    )
    np.testing.assert_array_equal(
        model.predict({"features": x.astype(np.float64)})["probability"],
        booster.inplace_predict(x.astype(np.float64)),
    )


def test_concurrent_threads_get_their_own_rows_back(artifact: Path) -> None:
    model = runtime(artifact)
    inputs = [rows(1 + i % 9, seed=i) for i in range(200)]
    alone = [model.predict({"features": x})["probability"] for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: model.predict({"features": x})["probability"], inputs))
    for want, got in zip(alone, together, strict=True):
        np.testing.assert_array_equal(got, want)
    model.close()
