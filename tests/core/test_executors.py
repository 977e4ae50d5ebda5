"""XGBoost versions run on compiled trees for small batches and on XGBoost for large ones.

On the example models: ``fraud`` (XGBoost, 300 trees) gets both executors;
``churn`` is ONNX already and runs on ONNX Runtime alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import xgboost as xgb
from factory import FEATURES, train_xgboost, xgboost_config

from server.core.model_config import ModelConfig
from server.core.repository import ModelRepository
from server.core.runtimes import RUNTIMES, Runtime, SignatureMismatch
from server.core.runtimes.base import ExecutorTiming
from server.core.runtimes.hybrid import load_xgboost, switch_rows
from server.core.runtimes.xgboost import XGBoostRuntime

SIZES = (1, 8, 64, 512)


def load(
    repo: Path, model: str, version: int, *, isolated: bool = False, **options: Any
) -> Runtime:
    config = ModelRepository(repo).read_config(model)
    source = ModelRepository(repo).read_version(model, version, config)
    factory = RUNTIMES[source.runtime]
    merged = {**config.runtime_options, **options}
    return factory(source.artifact, config.signature(), merged, isolated=isolated)


def holdout(repo: Path, model: str, version: int, rows: int) -> np.ndarray:
    config = ModelRepository(repo).read_config(model)
    names = config.inputs[0].feature_names
    table = pq.read_table(repo / model / str(version) / "holdout.parquet", columns=names)
    x = np.column_stack([table.column(n).to_numpy() for n in names]).astype(np.float32)
    return np.ascontiguousarray(np.resize(x, (rows, x.shape[1])))


@pytest.fixture(scope="module")
def fraud(example_repo: Path) -> Iterator[dict[str, Runtime]]:
    runtimes = {
        mode: load(example_repo, "fraud", 2, executor=mode)
        for mode in ("auto", "xgboost", "compiled")
    }
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


@pytest.fixture(scope="module")
def fraud_rows(example_repo: Path) -> np.ndarray:
    return holdout(example_repo, "fraud", 2, 512)


def test_fraud_serves_on_both_executors_within_the_tolerance(fraud: dict[str, Runtime]) -> None:
    executors = fraud["auto"].executors
    assert executors.names == ("compiled", "xgboost")
    assert executors.mode == "auto"
    assert executors.switch_rows is not None
    assert executors.switch_rows > 1
    assert executors.parity is not None
    assert executors.parity <= 1e-5
    assert executors.tolerance == 1e-5
    assert (
        executors.summary()
        == f"compiled 1-{executors.switch_rows - 1}, xgboost {executors.switch_rows}+"
    )
    timed = {(t.executor, t.rows) for t in executors.timings}
    assert {("compiled", 1), ("xgboost", 1)} <= timed


@pytest.mark.parametrize("mode", ["auto", "xgboost", "compiled"])
@pytest.mark.parametrize("rows", SIZES)
def test_every_mode_keeps_the_output_contract_and_agrees_with_xgboost(
    fraud: dict[str, Runtime], fraud_rows: np.ndarray, mode: str, rows: int
) -> None:
    x = fraud_rows[:rows]
    out = fraud[mode].predict({"features": x})
    assert set(out) == {"probability"}
    assert out["probability"].dtype == np.float32
    assert out["probability"].shape == (rows,)
    assert out["probability"].flags.c_contiguous
    expected = fraud["xgboost"].predict({"features": x})["probability"]
    np.testing.assert_allclose(out["probability"], expected, rtol=0, atol=1e-5)


def test_a_batch_below_the_switch_runs_compiled_and_one_at_it_runs_xgboost(
    fraud: dict[str, Runtime], fraud_rows: np.ndarray
) -> None:
    switch = fraud["auto"].executors.switch_rows
    assert switch is not None
    for rows, executor in ((1, "compiled"), (switch - 1, "compiled"), (switch, "xgboost")):
        x = {"features": fraud_rows[:rows]}
        np.testing.assert_array_equal(
            fraud["auto"].predict(x)["probability"], fraud[executor].predict(x)["probability"]
        )
    # The two executors really answer differently somewhere, so the checks above tell them
    # apart (the largest difference was 8.3e-7 on the holdout when this was written).
    whole = {"features": fraud_rows}
    assert not np.array_equal(
        fraud["compiled"].predict(whole)["probability"],
        fraud["xgboost"].predict(whole)["probability"],
    )


def test_pinned_xgboost_is_bit_exact_with_xgboost_and_converts_nothing(
    fraud: dict[str, Runtime], fraud_rows: np.ndarray, example_repo: Path
) -> None:
    pinned = fraud["xgboost"]
    assert pinned.executors.names == ("xgboost",)
    assert pinned.executors.timings == ()
    assert isinstance(pinned, XGBoostRuntime)
    booster = xgb.Booster(model_file=str(example_repo / "fraud" / "2" / "model.ubj"))
    booster.set_param({"nthread": 1})
    for rows in SIZES:
        x = fraud_rows[:rows]
        np.testing.assert_array_equal(
            pinned.predict({"features": x})["probability"], booster.inplace_predict(x)
        )


def test_pinned_compiled_runs_every_batch_on_the_compiled_trees(
    fraud: dict[str, Runtime],
) -> None:
    executors = fraud["compiled"].executors
    assert executors.names == ("compiled",)
    assert executors.summary() == "compiled"
    assert executors.parity is not None
    assert executors.parity <= 1e-5


def test_a_compiled_form_that_fails_parity_loads_with_xgboost_alone_and_says_why(
    example_repo: Path, fraud_rows: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    # Tolerance 0: the compiled trees sum in another order, so they miss by ~1e-6.
    runtime = load(example_repo, "fraud", 2, parity_tolerance=0)
    try:
        assert runtime.executors.names == ("xgboost",)
        assert "parity check failed" in runtime.executors.note
        assert "parity_tolerance 0" in runtime.executors.note
        assert "serving with XGBoost alone" in caplog.text
        x = {"features": fraud_rows[:1]}
        assert runtime.predict(x)["probability"].shape == (1,)
    finally:
        runtime.close()


def test_pinned_compiled_that_fails_parity_does_not_load(example_repo: Path) -> None:
    with pytest.raises(SignatureMismatch, match="executor compiled: parity check failed"):
        load(example_repo, "fraud", 2, executor="compiled", parity_tolerance=0)


def test_churn_is_onnx_already_and_runs_on_onnx_runtime_alone(example_repo: Path) -> None:
    for version in (1, 2):
        runtime = load(example_repo, "churn", version)
        try:
            assert runtime.executors.names == ("onnxruntime",)
            assert runtime.executors.switch_rows is None
        finally:
            runtime.close()


def tiny(tmp_path: Path, **options: Any) -> Runtime:
    train_xgboost(tmp_path, trees=12)
    config = ModelConfig.model_validate(xgboost_config())
    return load_xgboost(tmp_path / "model.ubj", config.signature(), options)


def test_margin_output_has_no_compiled_form_and_says_so(tmp_path: Path) -> None:
    runtime = tiny(tmp_path, output="margin")
    assert runtime.executors.names == ("xgboost",)
    assert "margin" in runtime.executors.note


def test_an_objective_without_a_compiled_form_serves_with_xgboost(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, FEATURES)).astype(np.float32)
    booster = xgb.train(
        {"objective": "count:poisson", "max_depth": 2, "seed": 1},
        xgb.DMatrix(x, label=rng.poisson(2.0, 200), feature_names=[f"f{i}" for i in range(4)]),
        num_boost_round=3,
    )
    booster.save_model(str(tmp_path / "model.ubj"))
    config = ModelConfig.model_validate(xgboost_config())
    runtime = load_xgboost(tmp_path / "model.ubj", config.signature(), {})
    assert runtime.executors.names == ("xgboost",)
    assert "count:poisson has no compiled form" in runtime.executors.note


def test_missing_values_take_the_same_branch_on_both_executors(tmp_path: Path) -> None:
    train_xgboost(tmp_path, trees=12)
    doc = xgboost_config()
    doc["inputs"][0]["allow_nonfinite"] = True
    config = ModelConfig.model_validate(doc)
    runtime = load_xgboost(tmp_path / "model.ubj", config.signature(), {"executor": "compiled"})
    x = np.random.default_rng(2).normal(size=(50, FEATURES)).astype(np.float32)
    x[::3, 1] = np.nan
    reference = load_xgboost(tmp_path / "model.ubj", config.signature(), {"executor": "xgboost"})
    np.testing.assert_allclose(
        runtime.predict({"features": x})["probability"],
        reference.predict({"features": x})["probability"],
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"executor": "fastest"}, "runtime_options.executor must be one of"),
        ({"parity_tolerance": -1}, "parity_tolerance must be >= 0"),
        ({"parity_tolerance": "small"}, "parity_tolerance must be a number"),
    ],
)
def test_bad_executor_options_are_refused_by_name(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SignatureMismatch, match=message):
        tiny(tmp_path, **options)


def timings(*rows: tuple[int, float, float]) -> tuple[ExecutorTiming, ...]:
    found: list[ExecutorTiming] = []
    for size, xgboost_us, compiled_us in rows:
        found += [
            ExecutorTiming("xgboost", size, xgboost_us),
            ExecutorTiming("compiled", size, compiled_us),
        ]
    return tuple(found)


def test_the_switch_lies_where_the_measured_costs_cross() -> None:
    # Costs as measured on fraud v2: compiled faster at 16 rows, XGBoost at 32; the
    # lines through those points cross at 16 + (134 - 76) / ((200 - 76) - (172 - 134)) * 16.
    measured = timings((1, 79, 15), (16, 134, 76), (32, 172, 200), (64, 235, 428))
    assert switch_rows(measured) == 27
    assert switch_rows(timings((1, 70, 90), (2, 71, 95))) == 1
    assert switch_rows(timings((1, 70, 7), (2, 71, 8), (4, 72, 9))) == 8


def test_a_load_while_serving_prepares_the_compiled_trees_in_a_child_alike(
    example_repo: Path, fraud_rows: np.ndarray
) -> None:
    """isolated=True (a reload while serving): the child's trees, parity and switch serve
    exactly as those built in process."""
    here = load(example_repo, "fraud", 2)
    child = load(example_repo, "fraud", 2, isolated=True)
    try:
        assert child.executors.names == here.executors.names == ("compiled", "xgboost")
        assert child.executors.parity == here.executors.parity
        assert child.executors.switch_rows is not None
        for rows in (1, 8, 64, 512):
            x = {"features": fraud_rows[:rows]}
            assert np.array_equal(child.predict(x)["probability"], here.predict(x)["probability"])
    finally:
        here.close()
        child.close()


def test_a_child_whose_parity_check_fails_leaves_xgboost_alone_and_says_why(
    example_repo: Path,
) -> None:
    runtime = load(example_repo, "fraud", 2, parity_tolerance=0, isolated=True)
    try:
        assert runtime.executors.names == ("xgboost",)
        assert "parity check failed" in runtime.executors.note
    finally:
        runtime.close()
