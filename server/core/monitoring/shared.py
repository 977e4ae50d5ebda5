"""Predictions waiting for their labels, shared by every replica through the store.

Behind a load balancer the label for a request often reaches another replica
than the one that scored it. With Redis configured, each replica also writes
the scores of every prediction that has a request id (in the monitoring
worker, off the hot path, through the store's background writes), and a label
that finds no local prediction looks there. A joined prediction is deleted:
one label per prediction, whichever replica it reaches.

Redis holds about 100 bytes per prediction for ``feedback.retention_s``: size
``maxmemory`` (with ``volatile-ttl`` eviction) for rate x retention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson

from server.core.monitoring.feedback import StoredPrediction, VersionKey
from server.core.store import SharedStore


class SharedPredictions:
    """Request id -> (model, version, scores) in the shared store."""

    def __init__(self, store: SharedStore, retention_s: float) -> None:
        self._store = store
        self._retention = retention_s

    def _key(self, request_id: str) -> str:
        return self._store.key("feedback", request_id)

    def put(
        self, key: VersionKey, ids: Sequence[str | None], sizes: Sequence[int], scores: np.ndarray
    ) -> None:
        """Share the predictions of one block (``scores`` has one value per row, in order)."""
        header = orjson.dumps([key[0], key[1]]) + b"\n"
        offset = 0
        for request_id, size in zip(ids, sizes, strict=True):
            if request_id:
                row = np.ascontiguousarray(scores[offset : offset + size], dtype="<f8")
                self._store.put_later(
                    self._key(request_id), header + row.tobytes(), self._retention
                )
            offset += size

    async def claim(self, request_ids: Sequence[str]) -> list[bool] | None:
        """Take the shared copies of predictions this replica holds itself.

        False where the copy is gone: another replica joined a label to it
        first. None when the store is unavailable (each replica then joins what
        it holds). Queued writes are flushed first, so that a prediction made a
        moment ago is not mistaken for one already taken.
        """
        await self._store.flush()
        values = await self._store.take([self._key(i) for i in request_ids])
        return None if values is None else [value is not None for value in values]

    async def take(self, request_ids: Sequence[str], now: float) -> list[StoredPrediction | None]:
        """The shared predictions of ``request_ids`` (None where unknown), taken atomically."""
        values = await self._store.take([self._key(i) for i in request_ids])
        if values is None:
            return [None] * len(request_ids)
        return [_decode(value, now) if value is not None else None for value in values]


def _decode(value: bytes, now: float) -> StoredPrediction | None:
    try:
        split = value.index(b"\n")
        model, version = orjson.loads(value[:split])
        scores = np.frombuffer(value, dtype="<f8", offset=split + 1).astype(np.float64)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        return None
    if not isinstance(model, str) or not isinstance(version, int):
        return None
    return StoredPrediction((model, version), scores, now)
