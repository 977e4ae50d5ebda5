"""Feedback store, live quality metrics and the concept-drift verdict (no server)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from server.config import FeedbackSettings
from server.core.monitoring.feedback import PredictionStore, parse_labels
from server.core.monitoring.quality import QualityTracker, card_metrics, log_loss, roc_auc
from server.errors import InvalidInput


def scored(n: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    scores = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(scale=noise, size=n))))
    return scores, labels


def test_auc_and_log_loss_match_scikit_learn() -> None:
    scores, labels = scored(500, seed=1)
    scores[:50] = np.round(scores[:50], 1)  # ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert log_loss(scores, labels) == pytest.approx(sk_log_loss(labels, scores))


def test_auc_needs_both_classes() -> None:
    assert roc_auc(np.array([0.2, 0.9]), np.array([1.0, 1.0])) is None


def test_card_metrics_read_holdout_section_or_flat() -> None:
    assert card_metrics({"metrics": {"holdout": {"auc": 0.9, "rows": 10}}}) == {
        "auc": 0.9,
        "rows": 10.0,
    }
    assert card_metrics({"metrics": {"auc": 0.8}}) == {"auc": 0.8}
    assert card_metrics({}) == {}


def test_live_auc_below_the_card_by_the_margin_flips_concept_drift() -> None:
    settings = FeedbackSettings(window_labels=400, min_labels=100, auc_margin=0.05)
    tracker = QualityTracker({"auc": 0.85, "log_loss": 0.45, "accuracy": 0.8}, settings)
    scores, labels = scored(400, seed=2, noise=0.8)
    tracker.add(scores, labels)
    report = tracker.report()
    assert report["status"] == "ok", report
    assert report["metrics"]["auc"]["reference"] == 0.85
    scores, labels = scored(400, seed=3, noise=4.0)  # the world changed: scores barely inform
    tracker.add(scores, labels)
    report = tracker.report()
    assert report["status"] == "alert"
    assert report["metrics"]["auc"]["status"] == "alert"
    assert report["metrics"]["auc"]["delta"] < -0.05


def test_margin_is_configurable() -> None:
    settings = FeedbackSettings(window_labels=400, min_labels=100, auc_margin=0.5)
    tracker = QualityTracker({"auc": 0.85}, settings)
    tracker.add(*scored(400, seed=4, noise=4.0))
    assert tracker.report()["metrics"]["auc"]["status"] == "ok"


def test_too_few_labels_give_no_verdict() -> None:
    tracker = QualityTracker({"auc": 0.85}, FeedbackSettings(min_labels=100))
    tracker.add(*scored(50, seed=5))
    assert tracker.report()["status"] == "insufficient_data"


def test_regressor_reports_mae_against_the_card() -> None:
    settings = FeedbackSettings(window_labels=100, min_labels=10, mae_margin=0.25)
    tracker = QualityTracker({"mae": 1.0}, settings)
    tracker.add(np.full(50, 10.0), np.full(50, 11.0))
    assert tracker.report()["metrics"]["mae"]["status"] == "ok"
    tracker.add(np.full(100, 10.0), np.full(100, 12.0))
    report = tracker.report()
    assert report["metrics"]["mae"]["live"] == pytest.approx(2.0)
    assert report["status"] == "alert"


def test_store_evicts_by_count_and_by_age() -> None:
    store = PredictionStore(max_items=3, retention_s=100.0)
    for i in range(5):
        store.put(("m", 1), [f"r{i}"], [1], np.array([0.1 * i]), now=float(i))
    assert len(store) == 3
    assert store.take("r0", now=5.0) is None
    taken = store.take("r4", now=5.0)
    assert taken is not None
    assert taken.key == ("m", 1)
    assert taken.scores.tolist() == pytest.approx([0.4])
    assert store.take("r4", now=5.0) is None  # a label consumes its prediction
    assert store.take("r2", now=103.0) is None  # older than the retention
    assert store.take("r3", now=102.5) is not None


def test_store_keeps_every_row_of_a_request_and_newest_reused_id() -> None:
    store = PredictionStore(max_items=10, retention_s=100.0)
    store.put(("m", 1), ["a", None, "b"], [2, 1, 3], np.arange(6.0), now=0.0)
    store.put(("m", 2), ["a"], [1], np.array([9.0]), now=1.0)
    b = store.take("b", now=1.0)
    assert b is not None
    assert b.scores.tolist() == [3.0, 4.0, 5.0]
    a = store.take("a", now=1.0)
    assert a is not None
    assert (a.key, a.scores.tolist()) == (("m", 2), [9.0])
    assert len(store) == 0


def test_store_keeps_the_last_of_an_id_repeated_in_one_block() -> None:
    store = PredictionStore(max_items=10, retention_s=100.0)
    store.put(("m", 1), ["a", "b", "a"], [1, 2, 1], np.arange(4.0), now=0.0)
    assert len(store) == 2
    a = store.take("a", now=0.0)
    assert a is not None
    assert a.scores.tolist() == [3.0]
    assert store.take("a", now=0.0) is None
    b = store.take("b", now=0.0)
    assert b is not None
    assert b.scores.tolist() == [1.0, 2.0]


def test_store_evicts_whole_blocks_counting_only_what_was_still_waiting() -> None:
    store = PredictionStore(max_items=4, retention_s=100.0)
    store.put(("m", 1), ["a", "b", "c"], [1, 1, 1], np.zeros(3), now=0.0)
    assert store.take("b", now=0.0) is not None
    store.put(("m", 1), ["d", "e", "f"], [1, 1, 1], np.ones(3), now=1.0)
    assert len(store) == 3  # a and c went with their block
    assert store.evicted == 2
    assert store.take("a", now=1.0) is None
    assert [store.take(i, now=1.0) is not None for i in "def"] == [True] * 3
    store.put(("m", 1), ["g", "h"], [1, 1], np.zeros(2), now=2.0)
    store.put(("m", 1), ["g", "i", "j"], [1, 1, 1], np.full(3, 2.0), now=3.0)  # g again
    store.put(("m", 1), ["k"], [1], np.ones(1), now=4.0)
    assert len(store) == 4  # g, i, j, k: the first g's block went, and h with it
    assert store.take("h", now=4.0) is None
    g = store.take("g", now=4.0)
    assert g is not None
    assert g.scores.tolist() == [2.0]  # the newest request with that id


def test_store_indexes_lazily_yet_newest_reused_id_wins() -> None:
    store = PredictionStore(max_items=100, retention_s=100.0)
    store.put(("m", 1), ["x", "y"], [1, 1], np.array([1.0, 2.0]), now=0.0)
    assert store.take("y", now=0.0) is not None  # indexes the first block
    store.put(("m", 1), ["x"], [1], np.array([3.0]), now=1.0)
    store.put(("m", 2), [None, "x"], [2, 1], np.array([4.0, 5.0, 6.0]), now=2.0)
    x = store.take("x", now=2.0)
    assert x is not None
    assert (x.key, x.scores.tolist()) == (("m", 2), [6.0])
    assert store.take("x", now=2.0) is None  # the older x went with it
    assert len(store) == 0


def test_store_joins_any_id_even_one_with_a_nul_character() -> None:
    store = PredictionStore(max_items=10, retention_s=100.0)
    odd = ["a\x00b", "c", "", "d\x00"]
    store.put(("m", 1), odd, [1, 1, 1, 1], np.arange(4.0), now=0.0)
    store.put(("m", 1), ["plain", "ids"], [1, 1], np.arange(4.0, 6.0), now=0.0)
    got = {i: store.take(i, now=0.0) for i in ["a\x00b", "c", "d\x00", "plain", "ids", "a"]}
    assert {i: p.scores.tolist() for i, p in got.items() if p is not None} == {
        "a\x00b": [0.0],
        "c": [1.0],
        "d\x00": [3.0],
        "plain": [4.0],
        "ids": [5.0],
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"label": 1}, "'id'"),
        ({"id": "a"}, "'label' is missing"),
        ({"id": "a", "label": "yes"}, "finite number"),
        ({"labels": []}, "non-empty list"),
        ({"labels": [{"id": "a", "label": 1}, 3]}, r"labels\[1\]"),
    ],
)
def test_bad_feedback_is_rejected_with_a_reason(body: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_labels(body)


def test_feedback_forms() -> None:
    single = parse_labels({"id": "a", "label": 1})
    assert single[0].request_id == "a"
    assert single[0].values.tolist() == [1.0]
    rows = parse_labels({"labels": [{"request_id": "b", "label": [0, 1, True]}]})
    assert rows[0].values.tolist() == [0.0, 1.0, 1.0]
