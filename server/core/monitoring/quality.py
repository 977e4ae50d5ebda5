"""Live model quality from feedback labels, against the holdout metrics on the model card.

A classifier (binary, score = probability of the positive class) is measured by
AUC, log-loss and accuracy at 0.5; a regressor by MAE. Concept drift is
flagged when a live metric is worse than the card's by more than its margin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import rankdata

from server.config import FeedbackSettings
from server.core.monitoring.drift import Status, worst

CLASSIFICATION = ("auc", "log_loss", "accuracy")
REGRESSION = ("mae",)
_HOLDOUT_KEYS = ("holdout", "test", "validation", "eval")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney AUC with average ranks for ties; None without both classes."""
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(scores, 1e-15, 1 - 1e-15)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((scores >= 0.5) == (labels == 1)))


def mae(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.abs(scores - labels)))


def card_metrics(card: Mapping[str, Any]) -> dict[str, float]:
    """Holdout metrics from card.yaml: ``metrics: {auc: ..}`` or ``metrics: {holdout: {..}}``."""
    metrics = card.get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    for key in _HOLDOUT_KEYS:
        nested = metrics.get(key)
        if isinstance(nested, Mapping):
            metrics = nested
            break
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class QualityTracker:
    """The last ``window_labels`` (score, label) pairs of one version, and their verdict."""

    def __init__(self, card: Mapping[str, float], settings: FeedbackSettings) -> None:
        self.card = dict(card)
        self.settings = settings
        size = settings.window_labels
        self._scores = np.zeros(size, dtype=np.float64)
        self._labels = np.zeros(size, dtype=np.float64)
        self._next = 0
        self._filled = 0
        self.labels_total = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        size = len(self._scores)
        for start in range(0, len(scores), size):
            s, y = scores[start : start + size], labels[start : start + size]
            slots = (self._next + np.arange(len(s))) % size
            self._scores[slots] = s
            self._labels[slots] = y
            self._next = int((self._next + len(s)) % size)
            self._filled = min(self._filled + len(s), size)
        self.labels_total += len(scores)

    def _task(self, labels: np.ndarray) -> tuple[str, ...]:
        if any(k in self.card for k in REGRESSION) and not any(
            k in self.card for k in CLASSIFICATION
        ):
            return REGRESSION
        if any(k in self.card for k in CLASSIFICATION):
            return CLASSIFICATION
        binary = bool(np.all((labels == 0) | (labels == 1)))
        return CLASSIFICATION if binary else REGRESSION

    def report(self) -> dict[str, Any]:
        n = self._filled
        scores, labels = self._scores[:n], self._labels[:n]
        names = self._task(labels) if n else CLASSIFICATION
        live: dict[str, float | None] = {}
        if n:
            for name in names:
                live[name] = _METRICS[name](scores, labels)
        metrics: dict[str, dict[str, Any]] = {}
        statuses = []
        for name in names:
            value, reference = live.get(name), self.card.get(name)
            status = self._judge(name, value, reference, n)
            statuses.append(status)
            metrics[name] = {
                "live": value,
                "reference": reference,
                "delta": None if value is None or reference is None else value - reference,
                "status": status.value,
            }
        status = Status.INSUFFICIENT if n < self.settings.min_labels else worst(statuses)
        return {
            "status": status.value,
            "labels": n,
            "labels_total": self.labels_total,
            "window_labels": self.settings.window_labels,
            "metrics": metrics,
        }

    def _judge(self, name: str, value: float | None, reference: float | None, n: int) -> Status:
        if n < self.settings.min_labels or value is None:
            return Status.INSUFFICIENT
        if reference is None:
            return Status.NO_REFERENCE
        s = self.settings
        if name == "auc":
            worse = value < reference - s.auc_margin
        elif name == "accuracy":
            worse = value < reference - s.accuracy_margin
        elif name == "log_loss":
            worse = value > reference * (1 + s.log_loss_margin)
        else:
            worse = value > reference * (1 + s.mae_margin)
        return Status.ALERT if worse else Status.OK


_METRICS = {
    "auc": roc_auc,
    "log_loss": log_loss,
    "accuracy": accuracy,
    "mae": mae,
}
