"""The rows of the result cache: how a row is held (``RowLayout``) and the bounded LRU.

A row is one row of every output of a version, held as the bytes of one
record of the version's layout (a structured dtype: each output's dtype and
row shape). Bytes, not arrays: 100,000 cached rows as arrays and tuples are
300,000 objects for the garbage collector, whose full collections then cost
tens of milliseconds (p99 27 ms, 32 % less throughput with every lookup a
miss); bytes are not tracked at all. ``server.core.cache`` builds the
dispatcher around these.
"""

from __future__ import annotations

import ast
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import orjson

from server.core.dispatch import Tensors
from server.core.model_config import CacheConfig
from server.errors import RuntimeFailure

Row = bytes
# Per entry beyond its key and row bytes: the OrderedDict slot and two bytes headers.
ENTRY_OVERHEAD = 150
_EXPIRY = struct.Struct("<d")
_PER_ENTRY = _EXPIRY.size + ENTRY_OVERHEAD


@dataclass(slots=True)
class CacheCounters:
    """What the metrics export; rows, not requests (the cache is per row)."""

    hits: int = 0  # rows answered from memory or Redis
    shared_hits: int = 0  # of those, answered from Redis
    misses: int = 0  # rows computed
    joined: int = 0  # rows that waited for another caller's computation
    evictions: int = 0
    lookup_ns: int = 0


class RowLRU:
    """Rows by full key, bounded in entries and bytes, least recently used out first."""

    def __init__(
        self, config: CacheConfig, counters: CacheCounters, clock: Callable[[], float]
    ) -> None:
        # key -> expiry (8 bytes) + row: nothing here for the garbage collector to walk
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._ttl = config.ttl_s
        self._counters = counters
        self._clock = clock
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float | None = None) -> Row | None:
        """The row under ``key``, unless it expired by ``now`` (read only when found)."""
        value = self._entries.get(key)
        if value is None:
            return None
        if _EXPIRY.unpack_from(value)[0] <= (self._clock() if now is None else now):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value[_EXPIRY.size :]

    def put_many(self, rows: Sequence[tuple[bytes, Row]], now: float) -> None:
        """Store rows computed at ``now``, then evict down to the bounds."""
        entries = self._entries
        expiry = _EXPIRY.pack(now + self._ttl)
        limit = self._max_bytes
        for key, row in rows:
            if key in entries:
                self._drop(key)
            nbytes = len(key) + len(row) + _PER_ENTRY
            if nbytes > limit:
                continue
            entries[key] = expiry + row
            self.bytes += nbytes
        if len(entries) > self._max_entries or self.bytes > limit:
            self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self._max_entries or self.bytes > self._max_bytes:
            # popitem, not next(iter()): half the cost on an OrderedDict under churn
            oldest, value = entries.popitem(last=False)
            self.bytes -= len(oldest) + len(value) + ENTRY_OVERHEAD
            self._counters.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> None:
        self.bytes -= len(key) + len(self._entries.pop(key)) + ENTRY_OVERHEAD


class RowLayout:
    """One row of every output as the bytes of one record; known once a row was computed.

    With a single output a row is that output's row bytes and is read back
    with one ``frombuffer`` (no structured record to take apart): the same
    bytes either way, since a one-field record has no padding.
    """

    def __init__(self, outputs: Sequence[str]) -> None:
        self.outputs = tuple(outputs)
        self.dtype: np.dtype[np.void] | None = None
        self.text = ""  # repr of the layout's descr: what a Redis value names
        self._spec: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...] = ()
        self._single: tuple[str, np.dtype[Any], tuple[int, ...]] | None = None

    def block(self, outputs: Tensors) -> bytes:
        """All the rows of computed outputs as records of the layout, one after another."""
        single = self._single
        if single is not None:
            name, dtype, shape = single
            array = outputs[name]
            if array.dtype != dtype or array.shape[1:] != shape:
                self._changed(outputs)
            return array.tobytes()  # C order, whatever the array's own order
        spec = tuple((outputs[name].dtype, outputs[name].shape[1:]) for name in self.outputs)
        if self.dtype is None:
            self._learn(spec)
        elif spec != self._spec:
            self._changed(outputs)
        assert self.dtype is not None
        records = np.empty(len(outputs[self.outputs[0]]), self.dtype)
        for name in self.outputs:
            records[name] = outputs[name]
        return records.tobytes()

    def records(self, data: bytes, rows: int) -> Tensors:
        """Outputs as read-only views of row bytes: a caller cannot change a cached row."""
        single = self._single
        if single is not None:
            name, dtype, shape = single
            array = np.frombuffer(data, dtype)
            return {name: array.reshape((rows, *shape)) if shape else array}
        assert self.dtype is not None
        records = np.frombuffer(data, self.dtype, count=rows)
        return {name: records[name] for name in self.outputs}

    def _learn(self, spec: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...]) -> None:
        layout: np.dtype[np.void] = np.dtype(
            [(name, dtype, shape) for name, (dtype, shape) in zip(self.outputs, spec, strict=True)]
        )
        self._set(layout, spec)

    def _set(
        self, layout: np.dtype[np.void], spec: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...]
    ) -> None:
        self.dtype, self.text, self._spec = layout, repr(layout.descr), spec
        if len(self.outputs) == 1:
            [(dtype, shape)] = spec
            self._single = (self.outputs[0], dtype, shape)

    def _changed(self, outputs: Tensors) -> NoReturn:
        spec = tuple((outputs[name].dtype, outputs[name].shape[1:]) for name in self.outputs)
        # the registry caches only fixed output row shapes
        raise RuntimeFailure(f"outputs changed their layout: {spec} after {self._spec}")

    # -- Redis values --------------------------------------------------------------------

    def encode(self, key: bytes, row: Row) -> bytes:
        """A Redis value: the layout, the full key and the row. Never pickle."""
        header = orjson.dumps([len(key), self.text])
        return b"".join([header, b"\n", key, row])

    def decode(self, key: bytes, value: bytes) -> Row | None:
        """The row stored under ``key``; None unless the value is for this exact key and layout."""
        split = value.find(b"\n")
        try:
            length, layout = orjson.loads(value[:split])
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        start = split + 1
        if not isinstance(length, int) or value[start : start + length] != key:
            return None  # not this key: a hash collision
        if self.dtype is None:
            self._adopt(layout)  # another replica computed it first
        if layout != self.text:
            return None
        row = value[start + length :]
        assert self.dtype is not None
        return row if len(row) == self.dtype.itemsize else None

    def _adopt(self, text: object) -> None:
        """Take the layout another replica wrote, when it fits this version's outputs."""
        try:
            descr = ast.literal_eval(text) if isinstance(text, str) else None
            layout: np.dtype[np.void] = np.dtype(descr)  # type: ignore[assignment]
        except (ValueError, TypeError, SyntaxError):
            return
        fields: Mapping[str, Any] = layout.fields or {}
        kinds = {fields[name][0].base.kind for name in fields}
        if tuple(fields) == self.outputs and kinds <= set("biuf"):
            spec = tuple((fields[name][0].base, fields[name][0].shape) for name in fields)
            self._set(layout, spec)
