"""Drift statistics, windows and reports on plain arrays (no server)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from server.config import DriftSettings
from server.core.monitoring.divergence import chi2_homogeneity, js_distance, psi
from server.core.monitoring.drift import DriftMonitor
from server.core.monitoring.reference import (
    ProfileError,
    build_reference,
    load_reference,
    parse_reference,
)
from server.core.monitoring.window import ProfileWindow, WindowSpec
from server.core.signature import Datatype, Signature, TensorSpec

NAMES = ("a", "b", "kind")


def reference(rows: int = 5000, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return build_reference(
        "m",
        1,
        {
            "a": rng.normal(size=rows),
            "b": rng.exponential(size=rows),
            "kind": rng.choice([0.0, 1.0, 2.0], size=rows, p=[0.6, 0.3, 0.1]),
        },
        {"score": (rng.random(rows), None)},
        categorical=frozenset({"kind"}),
    )


def signature() -> Signature:
    return Signature(
        inputs=(TensorSpec("x", Datatype.FP32, (-1, 3), feature_names=NAMES),),
        outputs=(TensorSpec("score", Datatype.FP32, (-1,)),),
    )


def rows(n: int, seed: int, shift_a: float = 0.0, kinds: tuple[float, ...] = (0.6, 0.3, 0.1)):
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(size=n) + shift_a,
            rng.exponential(size=n),
            rng.choice([0.0, 1.0, 2.0], size=n, p=list(kinds)),
        ]
    ).astype(np.float32)
    return {"x": x}, {"score": rng.random(n).astype(np.float32)}


def monitor(**settings: float) -> DriftMonitor:
    doc = reference()
    return DriftMonitor(parse_reference(doc, "test"), signature(), DriftSettings(**settings))


def test_identical_distributions_have_zero_distance() -> None:
    p = np.array([0.2, 0.3, 0.5])
    assert psi(p, p) == pytest.approx(0.0)
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-9)
    stat, p_value = chi2_homogeneity(p * 1000, p, 1000)
    assert stat == pytest.approx(0.0)
    assert p_value == pytest.approx(1.0)


def test_disjoint_distributions_have_js_distance_one_in_base_two() -> None:
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_psi_matches_the_credit_risk_formula() -> None:
    live, ref = np.array([0.5, 0.5]), np.array([0.3, 0.7])
    expected = (0.5 - 0.3) * math.log(0.5 / 0.3) + (0.5 - 0.7) * math.log(0.5 / 0.7)
    assert psi(live, ref) == pytest.approx(expected)


def test_reference_profile_round_trips_and_bins_by_searchsorted_right() -> None:
    doc = reference()
    profile = parse_reference(orjson.loads(orjson.dumps(doc)), "test")
    a = profile.features["a"]
    assert len(a.fractions) == len(a.edges) + 1 == 10
    assert profile.features["kind"].categories == ("0", "1", "2")
    assert profile.predictions["score"].column is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"features": []}, "'features' must be an object"),
        ({"features": {"a": {"kind": "numeric", "bin_edges": [0.0], "bin_fractions": [1]}}}, "a"),
        ({"features": {"a": {"kind": "weird"}}}, "kind must be"),
    ],
)
def test_bad_reference_names_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_reference({**reference(), **change}, "reference.json")


def test_missing_reference_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_reference(tmp_path / "reference.json")


def test_unshifted_traffic_is_ok_and_a_shifted_feature_alerts() -> None:
    m = monitor()
    m.update(*rows(3000, seed=1), now=0.0)
    report = m.report(0.0)
    assert report["data_drift"]["status"] == "ok"
    assert report["prediction_drift"]["status"] == "ok"
    m = monitor()
    m.update(*rows(3000, seed=2, shift_a=1.0), now=0.0)
    columns = m.report(0.0)["data_drift"]["columns"]
    assert columns["a"]["status"] == "alert"
    assert columns["b"]["status"] == "ok"
    assert columns["kind"]["status"] == "ok"


def test_a_categorical_shift_alerts_through_chi_squared_and_psi() -> None:
    m = monitor()
    m.update(*rows(3000, seed=3, kinds=(0.2, 0.3, 0.5)), now=0.0)
    kind = m.report(0.0)["data_drift"]["columns"]["kind"]
    assert kind["status"] == "alert"
    assert kind["p_value"] < 0.05


def test_too_few_rows_give_no_verdict() -> None:
    m = monitor(min_rows=500)
    m.update(*rows(100, seed=4, shift_a=3.0), now=0.0)
    report = m.report(0.0)
    assert report["data_drift"]["status"] == "insufficient_data"
    assert report["data_drift"]["columns"]["a"]["status"] == "insufficient_data"


def test_thresholds_are_configurable() -> None:
    m = monitor(psi_warn=5.0, psi_alert=10.0)
    m.update(*rows(3000, seed=5, shift_a=1.0), now=0.0)
    assert m.report(0.0)["data_drift"]["columns"]["a"]["status"] == "ok"


def test_window_keeps_only_the_latest_sub_windows() -> None:
    m = monitor(window_rows=100, windows=3)
    m.update(*rows(1000, seed=6, shift_a=3.0), now=0.0)
    m.update(*rows(300, seed=7), now=1.0)
    report = m.report(1.0)
    assert report["window"]["rows"] == 300
    assert report["window"]["rows_total"] == 1300
    assert report["data_drift"]["columns"]["a"]["status"] == "ok"


def test_old_sub_windows_expire_with_time() -> None:
    m = monitor(window_rows=1000, window_s=10.0, windows=2)
    m.update(*rows(200, seed=8), now=0.0)
    m.update(*rows(200, seed=9), now=15.0)
    assert m.report(15.0)["window"]["rows"] == 400
    assert m.report(25.0)["window"]["rows"] == 200


def test_data_quality_counts_missing_nonfinite_and_out_of_range() -> None:
    m = monitor()
    inputs, outputs = rows(1000, seed=10)
    x = inputs["x"]
    x[:100, 0] = np.nan
    x[100:150, 0] = np.inf
    x[150:250, 0] = 1e6  # beyond the reference max
    x[:40, 2] = 7.0  # a category never seen in training
    m.update(inputs, outputs, now=0.0)
    columns = m.report(0.0)["data_drift"]["columns"]
    assert columns["a"]["missing_ratio"] == pytest.approx(0.1)
    assert columns["a"]["nonfinite_ratio"] == pytest.approx(0.05)
    assert columns["a"]["out_of_range_ratio"] == pytest.approx(100 / 850)
    assert columns["a"]["rows"] == 850
    assert columns["kind"]["out_of_range_ratio"] == pytest.approx(0.04)


def test_outputs_the_client_did_not_ask_for_still_count_features() -> None:
    m = monitor()
    inputs, _ = rows(500, seed=11)
    m.update(inputs, {}, now=0.0)
    report = m.report(0.0)
    assert report["data_drift"]["rows"] == 500
    assert report["prediction_drift"]["rows"] == 0


def test_memory_is_fixed_whatever_the_traffic() -> None:
    window = ProfileWindow(
        list(parse_reference(reference(), "t").features.items()), WindowSpec(100, 60.0, 4)
    )
    before = window._counts.nbytes
    x = rows(5000, seed=12)[0]["x"].astype(np.float64)
    window.update(x, now=0.0)
    assert window._counts.nbytes == before
    assert window.totals(0.0).rows == 400
