"""Telco churn: synthetic customers and a scikit-learn pipeline exported to ONNX.

Both versions are ``StandardScaler`` followed by a classifier, trained on the
same generated data set (seed ``SEED``): version 1 a logistic regression,
version 2 gradient-boosted trees (``GradientBoostingClassifier``; skl2onnx
1.20 cannot convert ``HistGradientBoostingClassifier`` fitted by scikit-learn
1.9). The ONNX graph takes ``features`` (float32 [N, 16]) and returns
``label`` (int64 [N]) and ``probabilities`` (float32 [N, 2]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
from numpy.typing import NDArray
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from models.common import (
    Columns,
    Contract,
    ContractError,
    Dataset,
    Prediction,
    Recipe,
    Trained,
    calibrate_intercept,
)

SEED = 20240612
ROWS = 25_000
HOLDOUT_ROWS = 5_000
CHURN_RATE = 0.26
# Pinned so the graph, and so the artifact bytes, do not follow the installed converter's default.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
OUTPUTS = ("label", "probabilities")

VERSIONS: dict[int, tuple[str, str, dict[str, Any]]] = {
    1: (
        "Baseline: standard scaling + logistic regression",
        "logistic_regression",
        {"C": 1.0, "solver": "lbfgs", "max_iter": 1000},
    ),
    2: (
        "Challenger: standard scaling + gradient-boosted trees (150 trees of depth 3)",
        "gradient_boosting",
        {
            "n_estimators": 150,
            "max_depth": 3,
            "learning_rate": 0.1,
            "subsample": 0.8,
            "max_features": 0.5,
            "min_samples_leaf": 20,
        },
    ),
}


def generate(rows: int, seed: int) -> tuple[Columns, NDArray[np.int8]]:
    """Customers with plausible marginals; churn follows a hidden nonlinear propensity."""
    rng = np.random.default_rng(seed)
    c: Columns = {}
    c["tenure_months"] = np.clip(np.floor(rng.gamma(1.3, 22.0, rows)) + 1, 1, 72)
    # Long-standing customers are likelier to have signed a long contract.
    long_term = np.clip(0.15 + c["tenure_months"] / 120.0, 0, 0.8)
    draw = rng.random(rows)
    c["contract_months"] = np.asarray(
        np.select([draw < 1 - long_term, draw < 1 - long_term / 2], [1.0, 12.0], default=24.0),
        dtype=np.float64,
    )
    c["has_fiber"] = _flag(rng, 0.45, rows)
    c["num_services"] = (1 + rng.binomial(7, 0.35, rows)).astype(np.float64)
    list_price = 20 + 25 * c["has_fiber"] + 8 * c["num_services"]
    c["monthly_charges"] = np.round((list_price + rng.normal(0, 6, rows)).clip(18, 130), 2)
    c["total_charges"] = np.round(
        c["monthly_charges"] * c["tenure_months"] * rng.normal(1.0, 0.04, rows).clip(0.85, 1.15), 2
    )
    c["support_calls_90d"] = rng.poisson(0.7 + 0.5 * c["has_fiber"]).astype(np.float64)
    c["data_usage_gb"] = np.round(rng.lognormal(2.3 + 0.4 * c["has_fiber"], 0.8), 2)
    c["call_minutes"] = np.round(rng.gamma(2.0, 160.0, rows), 1)
    c["dropped_call_rate"] = np.round(rng.beta(1.3, 60.0, rows), 4)
    c["late_payments_12m"] = rng.poisson(0.45, rows).astype(np.float64)
    c["auto_pay"] = _flag(rng, 0.45, rows)
    c["paperless_billing"] = _flag(rng, 0.6, rows)
    c["senior"] = _flag(rng, 0.16, rows)
    c["dependents"] = _flag(rng, 0.3, rows)
    mood = 3.9 - 0.35 * c["support_calls_90d"] - 25 * c["dropped_call_rate"]
    c["satisfaction_score"] = np.clip(np.round(rng.normal(mood, 0.9)), 1, 5)

    logits = _propensity(c)
    p = 1.0 / (1.0 + np.exp(-(logits + calibrate_intercept(logits, CHURN_RATE))))
    return c, (rng.random(rows) < p).astype(np.int8)


def _flag(rng: np.random.Generator, p: float, rows: int) -> NDArray[np.float64]:
    return (rng.random(rows) < p).astype(np.float64)


def _propensity(c: Columns) -> NDArray[np.float64]:
    """The hidden churn log-odds (up to an intercept)."""
    month_to_month = c["contract_months"] == 1
    risk = (
        -1.1 * np.log1p(c["tenure_months"] / 6.0)
        + 1.3 * month_to_month
        - 0.6 * (c["contract_months"] == 24)
        + 0.5 * c["has_fiber"]
        + 0.025 * (c["monthly_charges"] - 65)
        + 0.3 * np.minimum(c["support_calls_90d"], 5)
        + 20.0 * c["dropped_call_rate"]
        - 0.5 * c["auto_pay"]
        + 0.25 * c["paperless_billing"]
        + 0.35 * c["senior"]
        - 0.3 * c["dependents"]
        + 0.3 * np.minimum(c["late_payments_12m"], 4)
        - 0.55 * (c["satisfaction_score"] - 3)
        - 0.15 * (c["num_services"] - 3)
    )
    # Expensive fiber on a rolling contract is where competitors poach: a step that a
    # linear model cannot draw.
    risk += 1.6 * ((c["has_fiber"] == 1) & (c["monthly_charges"] > 90) & month_to_month)
    # Customers who barely use the data they pay for are on their way out.
    risk += 0.9 * (c["data_usage_gb"] < 3)
    return np.asarray(risk, dtype=np.float64)


def fit(version: int, train: Dataset, holdout: Dataset, contract: Contract) -> Trained:
    """Fit the pipeline, export it to ONNX and score both splits with ONNX Runtime."""
    _, kind, tuned = VERSIONS[version]
    classifier: Any
    if kind == "logistic_regression":
        classifier = LogisticRegression(random_state=SEED + version, **tuned)
    else:
        classifier = GradientBoostingClassifier(random_state=SEED + version, **tuned)
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", classifier)])
    # One BLAS/OpenMP thread: parallel reductions could change the fitted floats between machines.
    with threadpool_limits(limits=1):
        pipeline.fit(train.features, train.labels.astype(np.int64))
    artifact = export(pipeline, contract, version)

    session = _session(artifact)
    _, on_train = session.run(list(OUTPUTS), {contract.input_name: train.features})
    _, on_holdout = session.run(list(OUTPUTS), {contract.input_name: holdout.features})
    return Trained(
        artifact=artifact,
        algorithm=f"scikit-learn Pipeline(StandardScaler, {type(classifier).__name__}) as ONNX",
        hyperparameters={"classifier": type(classifier).__name__, "random_state": SEED + version}
        | tuned,
        train_outputs={"probabilities": Prediction(np.asarray(on_train, np.float32), column=1)},
        holdout_scores=np.asarray(on_holdout, np.float32)[:, 1],
        libraries={
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnx_opset": ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in TARGET_OPSET.items()),
        },
    )


def export(pipeline: Pipeline, contract: Contract, version: int) -> bytes:
    """The pipeline as ONNX bytes with the contract's tensor names and nothing run-specific."""
    classifier = pipeline.steps[-1][1]
    width = len(contract.features)
    proto = convert_sklearn(
        pipeline,
        name=contract.model,
        initial_types=[(contract.input_name, FloatTensorType([None, width]))],
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    names = tuple(output.name for output in proto.graph.output)
    if names != OUTPUTS or names != contract.outputs:
        raise ContractError(
            f"skl2onnx produced outputs {names}, model.yaml declares {contract.outputs}"
        )
    # The converter leaves these free; fix them so two builds serialise identically.
    proto.doc_string = ""
    proto.graph.doc_string = ""
    proto.model_version = version
    # skl2onnx collects opset imports in a set, so their order follows the string hash seed.
    imports = sorted(proto.opset_import, key=lambda entry: (entry.domain, entry.version))
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _session(artifact: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])


RECIPE = Recipe(
    name="churn",
    artifact="model.onnx",
    seed=SEED,
    rows=ROWS,
    holdout_rows=HOLDOUT_ROWS,
    versions={v: description for v, (description, _, _) in VERSIONS.items()},
    generate=generate,
    fit=fit,
    generator="models.churn.generate",
)
