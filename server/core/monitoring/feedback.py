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
# The same bound as an infer request's id (an id longer than this never had a prediction):
# unmatched ids are echoed in the answer, so they must stay small.
MAX_ID_CHARS = 256
MAX_VALUES_PER_CALL = 1_000_000  # label values, all labels together (8 MB as float64)

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
    offsets: np.ndarray  # request i has scores[offsets[i]:offsets[i + 1]]
    packed: str | tuple[str, ...]  # the ids of the requests that had one (see _pack)
    count: int  # how many
    positions: tuple[int, ...] | None  # their request numbers; None: 0, 1, 2, ...
    live: int  # ids still answering to this block (once indexed)
    indexed: bool = False

    @property
    def ids(self) -> tuple[str, ...] | list[str]:
        packed = self.packed
        return packed.split(_SEPARATOR) if isinstance(packed, str) else packed


_SEPARATOR = "\x00"


def _pack(ids: tuple[str, ...]) -> str | tuple[str, ...]:
    """The ids as one string: thousands of small strings kept for seconds scatter
    over the allocator's pools and slow every request down (measured: ~3 us per
    request for a full store of 100k); one string per block does not. Ids that
    contain the separator stay a tuple."""
    packed = _SEPARATOR.join(ids)
    return packed if packed.count(_SEPARATOR) == len(ids) - 1 else ids


_POSITION_BITS = 32


class PredictionStore:
    """Request id -> (version, scores), oldest first; evicts by count and retention.

    Predictions arrive in blocks (one per version per monitoring cycle). Under
    load most of them leave the store (by count) before any label arrives, so
    a block's ids are indexed only when a lookup needs them: a label lookup
    first indexes every block that came since the last one, oldest first, so
    a reused id ends at its newest request. Until then a block costs a tuple of
    ids and its score array; dropping it touches no index.

    The index maps an id to its block number and request number, packed into one
    int: a dict of str -> int is not tracked by the garbage collector, and a
    block keeps its ids as one string. Eviction drops whole
    blocks, oldest first; a block goes as soon as all its predictions got
    labels. At most ``max_items`` predictions are held (an id sent again before
    it is indexed counts twice until then) and their rows stay under
    ``ROWS_PER_ITEM x max_items`` whatever the request sizes.
    """

    ROWS_PER_ITEM = 8

    def __init__(self, max_items: int, retention_s: float) -> None:
        self.max_items = max_items
        self.retention_s = retention_s
        self._index: dict[str, int] = {}
        self._blocks: dict[int, _Block] = {}
        self._order: deque[int] = deque()
        self._pending: deque[int] = deque()  # blocks not indexed yet, oldest first
        self._unindexed = 0  # ids in those blocks
        self._numbers = 0
        self._rows = 0
        self.evicted = 0

    def __len__(self) -> int:
        self._catch_up()
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
        if len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids for {len(rows)} row counts")
        named = tuple(filter(None, ids))
        if named:
            positions = None
            if len(named) != len(ids):
                positions = tuple(i for i, request_id in enumerate(ids) if request_id)
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(rows, out=offsets[1:])
            number = self._numbers
            self._numbers += 1
            block = _Block(key, now, scores, offsets, _pack(named), len(named), positions, 0)
            block.live = len(named)
            self._blocks[number] = block
            self._order.append(number)
            self._pending.append(number)
            self._unindexed += len(named)
            self._rows += len(scores)
        self.expire(now)

    def _catch_up(self) -> None:
        """Index every block not indexed yet, oldest first (the newest request of an id wins)."""
        index = self._index
        while self._pending:
            number = self._pending.popleft()
            block = self._blocks.get(number)
            if block is None:
                continue
            self._unindexed -= block.count
            block.indexed = True
            base = number << _POSITION_BITS
            positions = block.positions or range(block.count)
            ids = block.ids
            if index.keys().isdisjoint(ids):  # the usual block: fresh ids only
                before = len(index)
                index.update(zip(ids, [base | p for p in positions], strict=True))
                block.live = len(index) - before  # less than len(ids) if an id repeats
                continue
            block.live = 0
            for request_id, position in zip(ids, positions, strict=True):
                previous = index.get(request_id)
                if previous is not None:  # a reused id: the newer request wins
                    if previous >> _POSITION_BITS == number:
                        block.live -= 1
                    else:
                        self._release(previous >> _POSITION_BITS)
                index[request_id] = base | position
                block.live += 1
            if block.live == 0:
                self._drop(number, block)

    def _release(self, number: int) -> None:
        block = self._blocks.get(number)
        if block is not None:
            block.live -= 1
            if block.live == 0:
                self._drop(number, block)

    def _drop(self, number: int, block: _Block) -> None:
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
                len(self._index) + self._unindexed <= self.max_items
                and self._rows <= self.ROWS_PER_ITEM * self.max_items
                and oldest.at >= horizon
            ):
                break
            number = order.popleft()
            self._drop(number, oldest)
            self.evicted += oldest.live
            if not oldest.indexed:  # never looked up: nothing points at it
                self._pending.popleft()  # the oldest pending block is this one
                self._unindexed -= oldest.count
            elif oldest.live == oldest.count:  # distinct ids, each still pointing here
                deque(map(self._index.__delitem__, oldest.ids), maxlen=0)
            else:
                for request_id in oldest.ids:
                    entry = self._index.get(request_id)
                    if entry is not None and entry >> _POSITION_BITS == number:
                        del self._index[request_id]

    def take(self, request_id: str, now: float) -> StoredPrediction | None:
        """The prediction, removed: one label per prediction."""
        self.expire(now)
        stored = self.peek(request_id)
        if stored is not None:
            number = self._index.pop(request_id) >> _POSITION_BITS
            self._release(number)
        return stored

    def peek(self, request_id: str) -> StoredPrediction | None:
        self._catch_up()
        entry = self._index.get(request_id)
        if entry is None:
            return None
        block = self._blocks[entry >> _POSITION_BITS]
        position = entry & ((1 << _POSITION_BITS) - 1)
        start, end = block.offsets[position], block.offsets[position + 1]
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
        labels, values = [], 0
        for i, item in enumerate(items):
            label = _label(item, f"labels[{i}]")
            values += len(label.values)
            if values > MAX_VALUES_PER_CALL:
                raise InvalidInput(
                    f"feedback labels[0..{i}] hold {values} values; send at most "
                    f"{MAX_VALUES_PER_CALL} per call"
                )
            labels.append(label)
        return labels
    return [_label(doc, "feedback")]


def _label(item: Any, where: str) -> Label:
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object with 'id' and 'label'")
    request_id = item.get("id", item.get("request_id"))
    if not isinstance(request_id, str) or not request_id:
        raise InvalidInput(f"{where}: 'id' must be the non-empty request id of a prediction")
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidInput(
            f"{where}: 'id' has {len(request_id)} characters; at most {MAX_ID_CHARS} are allowed"
        )
    if "label" not in item:
        raise InvalidInput(f"{where}: 'label' is missing")
    raw = item["label"]
    values = raw if isinstance(raw, list) else [raw]
    if len(values) > MAX_VALUES_PER_CALL:
        raise InvalidInput(
            f"{where}: 'label' has {len(values)} values; at most {MAX_VALUES_PER_CALL} per call"
        )
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
