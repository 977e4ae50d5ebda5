"""Card-payment fraud: synthetic transactions and an XGBoost binary classifier.

Both versions train on the same generated data set (seed ``SEED``) and are
scored on the same holdout rows, so their metrics compare like for like.
Version 1 is a smaller, faster-learning first model (200 trees of depth 4);
version 2, the default, is the 300-tree, depth-6 model the benchmarks use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xgboost as xgb
from numpy.typing import NDArray

from models.common import (
    Columns,
    Contract,
    Dataset,
    Prediction,
    Recipe,
    Trained,
    calibrate_intercept,
)

SEED = 20240611
ROWS = 60_000
HOLDOUT_ROWS = 5_000
FRAUD_RATE = 0.03
# Fixed thread count: XGBoost's result must not depend on the build machine's cores.
THREADS = 2

VERSIONS: dict[int, tuple[str, int, dict[str, Any]]] = {
    1: (
        "First version: 200 shallow trees (depth 4), higher learning rate",
        200,
        {
            "max_depth": 4,
            "eta": 0.1,
            "subsample": 0.9,
            "colsample_bytree": 1.0,
            "min_child_weight": 5.0,
            "lambda": 2.0,
        },
    ),
    2: (
        "Current version and benchmark model: 300 trees of depth 6",
        300,
        {
            "max_depth": 6,
            "eta": 0.05,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "min_child_weight": 1.0,
            "lambda": 1.0,
        },
    ),
}

# Transactions per hour of day (00-11h, then 12-23h): a quiet night and an evening peak.
_HOURLY = np.concatenate(
    (
        [1.0, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.5, 4.0, 5.0, 5.5, 6.0],
        [6.5, 6.2, 5.8, 5.6, 5.8, 6.5, 7.0, 6.6, 5.5, 4.0, 2.8, 1.8],
    )
)
_WEEKDAY = np.array([1.0, 0.95, 0.95, 1.0, 1.15, 1.3, 1.05])
# Risk of each of 15 merchant categories (groceries ... gambling, crypto).
_CATEGORY_RISK = np.array(
    [0.02, 0.03, 0.04, 0.05, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.45, 0.6, 0.8]
)
_CATEGORY_SHARE = np.array([16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2.5, 1.5, 1.2, 0.8])


def generate(rows: int, seed: int) -> tuple[Columns, NDArray[np.int8]]:
    """Transactions with plausible marginals; the label follows a hidden nonlinear risk."""
    rng = np.random.default_rng(seed)
    c: Columns = {}
    c["hour"] = rng.choice(24, size=rows, p=_HOURLY / _HOURLY.sum()).astype(np.float64)
    c["day_of_week"] = rng.choice(7, size=rows, p=_WEEKDAY / _WEEKDAY.sum()).astype(np.float64)
    c["is_online"] = _flag(rng, 0.35, rows)
    online = c["is_online"] == 1
    c["is_international"] = _flag(rng, np.where(online, 0.09, 0.04), rows)
    c["is_chip"] = np.where(online, 0.0, _flag(rng, 0.88, rows))
    c["is_pin"] = np.where(c["is_chip"] == 1, _flag(rng, 0.55, rows), 0.0)

    c["avg_amount_30d"] = np.round(rng.lognormal(3.7, 0.55, rows), 2)
    c["amount"] = np.round(c["avg_amount_30d"] * rng.lognormal(-0.1, 0.75, rows), 2)
    c["amount_to_avg_ratio"] = c["amount"] / c["avg_amount_30d"]
    c["txn_count_1h"] = rng.poisson(0.35, rows).astype(np.float64)
    c["txn_count_24h"] = c["txn_count_1h"] + rng.poisson(2.6, rows)
    c["txn_count_7d"] = c["txn_count_24h"] + rng.poisson(15.0, rows)
    c["amount_sum_24h"] = np.round(
        c["amount"] + c["avg_amount_30d"] * rng.gamma(np.maximum(c["txn_count_24h"], 0.1), 1.0), 2
    )

    category = rng.choice(len(_CATEGORY_RISK), size=rows, p=_CATEGORY_SHARE / _CATEGORY_SHARE.sum())
    c["merchant_category_risk"] = _CATEGORY_RISK[category]
    c["merchant_risk"] = np.clip(rng.beta(2.0, 9.0, rows) + 0.3 * c["merchant_category_risk"], 0, 1)
    c["new_merchant"] = _flag(rng, 0.18, rows)
    c["distance_from_home_km"] = np.round(rng.lognormal(np.where(online, 2.5, 1.6), 1.2), 1)
    c["distance_from_last_txn_km"] = np.round(rng.lognormal(1.0, 1.5, rows), 1)
    c["minutes_since_last_txn"] = np.round(rng.exponential(24 * 60 / (1 + c["txn_count_24h"])), 1)

    c["card_age_days"] = np.floor(rng.gamma(1.6, 420.0, rows)) + 1
    c["account_age_days"] = c["card_age_days"] + np.floor(rng.gamma(1.2, 900.0, rows))
    c["customer_age"] = np.clip(np.round(rng.normal(43.0, 14.0, rows)), 18, 92)
    c["credit_utilisation"] = np.round(rng.beta(2.0, 5.0, rows), 3)
    c["chargebacks_12m"] = rng.poisson(0.06, rows).astype(np.float64)

    c["device_trust_score"] = np.round(rng.beta(6.0, 1.8, rows), 3)
    c["ip_risk_score"] = np.where(online, np.round(rng.beta(1.3, 9.0, rows), 3), 0.0)
    c["new_device"] = np.where(online, _flag(rng, 0.1, rows), 0.0)
    c["billing_shipping_mismatch"] = np.where(online, _flag(rng, 0.12, rows), 0.0)
    c["failed_logins_24h"] = rng.poisson(np.where(online, 0.15, 0.02)).astype(np.float64)
    c["declined_count_24h"] = rng.poisson(0.12, rows).astype(np.float64)

    logits = _risk(c)
    p = 1.0 / (1.0 + np.exp(-(logits + calibrate_intercept(logits, FRAUD_RATE))))
    return c, (rng.random(rows) < p).astype(np.int8)


def _flag(
    rng: np.random.Generator, p: float | NDArray[np.float64], rows: int
) -> NDArray[np.float64]:
    return (rng.random(rows) < p).astype(np.float64)


def _risk(c: Columns) -> NDArray[np.float64]:
    """The hidden fraud log-odds (up to an intercept): what a good model should recover."""
    night = (c["hour"] <= 4) | (c["hour"] >= 23)
    ratio = np.log(np.maximum(c["amount_to_avg_ratio"], 1e-3))
    new_card = np.exp(-c["card_age_days"] / 60.0)
    risk = (
        0.9 * np.clip(ratio, -1.0, 3.0)
        + 3.0 * c["merchant_risk"]
        + 1.8 * c["merchant_category_risk"]
        + 0.9 * c["is_international"]
        + 0.8 * night
        + 1.1 * c["new_device"]
        + 3.5 * c["ip_risk_score"]
        - 2.2 * c["device_trust_score"]
        + 0.55 * np.minimum(c["txn_count_1h"], 4)
        + 0.45 * np.minimum(c["declined_count_24h"], 3)
        + 0.35 * np.minimum(c["failed_logins_24h"], 4)
        + 0.9 * c["billing_shipping_mismatch"]
        - 0.7 * c["is_chip"]
        - 0.5 * c["is_pin"]
        + 0.25 * np.log1p(c["distance_from_home_km"])
        + 0.15 * np.log1p(c["distance_from_last_txn_km"])
        + 1.0 * new_card
        + 0.6 * np.minimum(c["chargebacks_12m"], 2)
        - 0.2 * np.log1p(c["minutes_since_last_txn"])
    )
    # Interactions only trees pick up: big first purchase at a new merchant online,
    # and a rapid burst of transactions on a young account.
    risk += 1.2 * ((c["amount"] > 250) & (c["new_merchant"] == 1) & (c["is_online"] == 1))
    risk += 0.8 * ((c["txn_count_1h"] >= 2) & (c["account_age_days"] < 365))
    # Sharpen the signal so the best achievable AUC sits near 0.9, as for real card fraud.
    return np.asarray(1.6 * risk, dtype=np.float64)


def fit(version: int, train: Dataset, holdout: Dataset, contract: Contract) -> Trained:
    """Train one version with ``xgboost.train``; scores come from the saved bytes."""
    _, rounds, tuned = VERSIONS[version]
    params: dict[str, Any] = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "max_bin": 256,
        "seed": SEED + version,
        "nthread": THREADS,
        **tuned,
    }
    names = list(contract.features)
    dtrain = xgb.DMatrix(train.features, label=train.labels, feature_names=names, nthread=THREADS)
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    artifact = bytes(booster.save_raw(raw_format="ubj"))

    # Score with the artifact as the server will load it, not the in-memory booster.
    saved = xgb.Booster(params={"nthread": THREADS}, model_file=bytearray(artifact))
    on_train = saved.predict(xgb.DMatrix(train.features, feature_names=names, nthread=THREADS))
    on_holdout = saved.predict(xgb.DMatrix(holdout.features, feature_names=names, nthread=THREADS))
    return Trained(
        artifact=artifact,
        algorithm="XGBoost gradient-boosted trees (xgboost.train, objective binary:logistic)",
        hyperparameters={"num_boost_round": rounds, **params},
        train_outputs={"probability": Prediction(np.asarray(on_train, dtype=np.float32))},
        holdout_scores=np.asarray(on_holdout, dtype=np.float32),
        libraries={"xgboost": xgb.__version__},
    )


RECIPE = Recipe(
    name="fraud",
    artifact="model.ubj",
    seed=SEED,
    rows=ROWS,
    holdout_rows=HOLDOUT_ROWS,
    versions={v: description for v, (description, _, _) in VERSIONS.items()},
    generate=generate,
    fit=fit,
    generator="models.fraud.generate",
)
