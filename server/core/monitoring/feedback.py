"""Ground-truth labels for earlier predictions, joined by request id.

The store keeps each answered request's scores by id, bounded by count and by
age, so labels join to the exact version that answered. A label takes its
prediction out of the store: sending it twice does not count it twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import InvalidInput

MAX_LABELS_PER_CALL = 10_000

VersionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class StoredPrediction:
    key: VersionKey
    scores: np.ndarray
    at: float


@dataclass(frozen=True, slots=True)
class Label:
    """One request's ground truth: one value per row the request scored."""

    request_id: str
    values: np.ndarray


@dataclass(slots=True)
class _Block:
    """The requests one version answered in one monitoring cycle."""

    key: VersionKey
    at: float
    scores: np.ndarray
    ids: list[str]
    live: int


class PredictionStore:
    """Request id -> (version, scores), oldest first; evicts by count and retention.

    Predictions arrive in blocks (one per version per monitoring cycle); the
    index maps an id to a slice of its block's score array. Index entries are
    tuples of ints, which the garbage collector does not track, so a full store
    adds nothing to collection pauses. Eviction drops whole blocks, oldest
    first; a block goes as soon as all its predictions got labels, and the rows
    held stay under ``ROWS_PER_ITEM x max_items`` whatever the request sizes.
    """

    ROWS_PER_ITEM = 8

    def __init__(self, max_items: int, retention_s: float) -> None:
        self.max_items = max_items
        self.retention_s = retention_s
        self._index: dict[str, tuple[int, int, int]] = {}
        self._blocks: dict[int, _Block] = {}
        self._order: deque[int] = deque()
        self._numbers = 0
        self._rows = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._index)

    def put(
        self,
        key: VersionKey,
        ids: Sequence[str | None],
        rows: Sequence[int],
        scores: np.ndarray,
        now: float,
    ) -> None:
        """Requests ``ids`` with ``rows`` rows each, in order; ``scores`` has one per row."""
        number = self._numbers
        self._numbers += 1
        block = _Block(key, now, scores, [], 0)
        index, blocks = self._index, self._blocks
        start = 0
        for request_id, n in zip(ids, rows, strict=True):
            if request_id is not None:
                previous = index.get(request_id)
                if previous is not None:  # a reused id: the newer request wins
                    self._release(previous[0])
                index[request_id] = (number, start, start + n)
                block.ids.append(request_id)
                block.live += 1
            start += n
        if block.live:
            blocks[number] = block
            self._order.append(number)
            self._rows += len(scores)
        self.expire(now)

    def _release(self, number: int) -> None:
        block = self._blocks.get(number)
        if block is not None:
            block.live -= 1
            if block.live == 0:
                del self._blocks[number]
                self._rows -= len(block.scores)

    def expire(self, now: float) -> None:
        horizon = now - self.retention_s
        order, blocks = self._order, self._blocks
        while order:
            oldest = blocks.get(order[0])
            if oldest is None:  # every prediction in it was labelled
                order.popleft()
                continue
            if (
                len(self._index) <= self.max_items
                and self._rows <= self.ROWS_PER_ITEM * self.max_items
                and oldest.at >= horizon
            ):
                break
            number = order.popleft()
            del blocks[number]
            self._rows -= len(oldest.scores)
            for request_id in oldest.ids:
                entry = self._index.get(request_id)
                if entry is not None and entry[0] == number:
                    del self._index[request_id]
                    self.evicted += 1

    def take(self, request_id: str, now: float) -> StoredPrediction | None:
        """The prediction, removed: one label per prediction."""
        self.expire(now)
        stored = self.peek(request_id)
        if stored is not None:
            number = self._index.pop(request_id)[0]
            self._release(number)
        return stored

    def peek(self, request_id: str) -> StoredPrediction | None:
        entry = self._index.get(request_id)
        if entry is None:
            return None
        number, start, end = entry
        block = self._blocks[number]
        return StoredPrediction(block.key, block.scores[start:end].copy(), block.at)


def parse_labels(doc: Any) -> list[Label]:
    """``{"id": .., "label": ..}`` or ``{"labels": [{"id": .., "label": ..}, ..]}``.

    ``label`` is a number, or a list with one number per row of the request.
    """
    if not isinstance(doc, dict):
        raise InvalidInput("feedback must be a JSON object")
    if "labels" in doc:
        items = doc["labels"]
        if not isinstance(items, list) or not items:
            raise InvalidInput("feedback 'labels' must be a non-empty list")
        if len(items) > MAX_LABELS_PER_CALL:
            raise InvalidInput(
                f"feedback has {len(items)} labels; send at most {MAX_LABELS_PER_CALL} per call"
            )
        return [_label(item, f"labels[{i}]") for i, item in enumerate(items)]
    return [_label(doc, "feedback")]


def _label(item: Any, where: str) -> Label:
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object with 'id' and 'label'")
    request_id = item.get("id", item.get("request_id"))
    if not isinstance(request_id, str) or not request_id:
        raise InvalidInput(f"{where}: 'id' must be the non-empty request id of a prediction")
    if "label" not in item:
        raise InvalidInput(f"{where}: 'label' is missing")
    raw = item["label"]
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(_is_number(v) for v in values):
        raise InvalidInput(f"{where}: 'label' must be a finite number or a list of them")
    return Label(request_id, np.asarray(values, dtype=np.float64))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(slots=True)
class FeedbackOutcome:
    """What one feedback call matched; the HTTP edge returns it as JSON."""

    matched: int = 0
    unmatched_ids: list[str] | None = None
    rejected: list[str] | None = None

    def miss(self, request_id: str) -> None:
        if self.unmatched_ids is None:
            self.unmatched_ids = []
        self.unmatched_ids.append(request_id)

    def reject(self, message: str) -> None:
        if self.rejected is None:
            self.rejected = []
        self.rejected.append(message)

    def to_dict(self, model: str, version: int | None, shown: int = 20) -> dict[str, Any]:
        unmatched = self.unmatched_ids or []
        doc: dict[str, Any] = {"model": model, "matched": self.matched}
        if version is not None:
            doc["version"] = str(version)
        doc["unmatched"] = len(unmatched)
        if unmatched:
            doc["unmatched_ids"] = unmatched[:shown]
        if self.rejected:
            doc["rejected"] = self.rejected[:shown]
        return doc


def rows_match(label: Label, stored: StoredPrediction) -> str | None:
    """Why a label cannot join its prediction, or None when it can."""
    if len(label.values) != len(stored.scores):
        return (
            f"id '{label.request_id}': {len(label.values)} label(s) for a request of "
            f"{len(stored.scores)} row(s)"
        )
    return None
