"""The per-row result cache: a dispatcher wrapped around the version's batcher.

``CachedDispatcher`` keeps the dispatcher contract (``submit(inputs, rows,
deadline)``), so the service, the stats, drift and feedback see a cached answer
exactly as a computed one: it is still a prediction of that version.

Key and identity. A row's key is the version's identity (model, version, the
artifact's sha256) followed by the row's canonical bytes (``server.core.tensors``:
every input's name, datatype, shape and little-endian C-order values). Entries
hold every output of the row; the outputs a request asks for are selected
afterwards by the service, so they need not be part of the key, and no request
parameter changes outputs today (``timeout`` does not). The full key is the
dictionary key, so two rows can only share an entry when their bytes are
equal: no hash collisions (Triton keys on a 64-bit hash). Request ids are never
part of it.

Shared work. Rows being computed are "in flight": a caller that wants one waits
for the first caller's computation instead of computing it again. Failures are
not cached. When the computing caller is cancelled or runs past its own
deadline while others wait, the rows are computed again in the background for
them, so one caller's cancellation never takes an answer from the others.

Bounds. Per version, whichever of ``max_entries`` and ``max_bytes`` comes first
evicts the least recently used rows; ``ttl_s`` bounds an entry's life. aiocache
is not used: its memory backend has no size bound (aiocache#429) and each
``await cache.get`` cost 11 µs here against 0.08 µs for this dictionary, and the
shared tier needs MGET and a circuit, which ``server.core.store`` provides.

Redis. With ``cache.backend: redis`` a miss in memory asks Redis (one MGET for
the request's rows) before computing, and computed rows are written back in the
background. A Redis key is a hash of the full key, but the value carries the
full key and is compared on read. When Redis is slow or down the store's
circuit answers "unavailable" at once: caching degrades to this process's
memory, never to a failed or slower request.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from server.core.batcher import Dispatcher, Tensors
from server.core.model_config import CacheConfig
from server.core.stats import VersionStats
from server.core.store import SharedStore
from server.core.tensors import one_row_bytes, row_bytes
from server.errors import DeadlineExceeded, RuntimeFailure, ServingError

log = logging.getLogger("sluice.cache")

# One row of every output, as the bytes of one record of the version's layout (a
# structured dtype: each output's dtype and row shape). Bytes, not arrays: 100,000
# cached rows as arrays and tuples are 300,000 objects for the garbage collector,
# whose full collections then cost tens of milliseconds (p99 27 ms, 32 % less
# throughput with every lookup a miss); bytes are not tracked at all.
Row = bytes
# Per entry beyond its key and row bytes: the OrderedDict slot and two bytes headers.
ENTRY_OVERHEAD = 150
_EXPIRY = struct.Struct("<d")


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

    def get(self, key: bytes, now: float) -> Row | None:
        value = self._entries.get(key)
        if value is None:
            return None
        if _EXPIRY.unpack_from(value)[0] <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value[_EXPIRY.size :]

    def put(self, key: bytes, row: Row, now: float) -> None:
        if key in self._entries:
            self._drop(key)
        nbytes = len(key) + len(row) + _EXPIRY.size + ENTRY_OVERHEAD
        if nbytes > self._max_bytes:
            return
        self._entries[key] = _EXPIRY.pack(now + self._ttl) + row
        self.bytes += nbytes
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self._counters.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> None:
        self.bytes -= len(key) + len(self._entries.pop(key)) + ENTRY_OVERHEAD


@dataclass(slots=True)
class _Flight:
    """A row being computed; the future exists once somebody waits for it."""

    future: asyncio.Future[Row] | None = None
    waiters: int = 0

    def join(self) -> asyncio.Future[Row]:
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        self.waiters += 1
        return self.future

    def settle(self, row: Row | None, error: BaseException | None = None) -> None:
        future = self.future
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(row)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Plan:
    """How one request's rows are answered."""

    found: list[Row | None]
    computed: Tensors | None = None  # the outputs, when this call computed every row
    mine: list[int] = field(default_factory=list)  # rows this caller computes
    theirs: list[tuple[int, asyncio.Future[Row]]] = field(default_factory=list)  # others compute


class CachedDispatcher:
    """The per-row result cache in front of a version's dispatcher (same contract)."""

    def __init__(
        self,
        inner: Dispatcher,
        identity: str,
        outputs: Sequence[str],
        config: CacheConfig,
        stats: VersionStats,
        shared: SharedStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner  # shadows call this directly: they never read or write the cache
        self._identity = identity.encode()
        self._outputs = tuple(outputs)
        self._ttl = config.ttl_s
        self._stats = stats
        self._shared = shared
        self._clock = clock
        self.counters = CacheCounters()
        self.rows = RowLRU(config, self.counters, clock)
        self._flights: dict[bytes, _Flight] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._layout: np.dtype[np.void] | None = None  # known once a row was computed
        self._layout_text = ""
        self._spec: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...] = ()

    @property
    def depth(self) -> int:
        return self.inner.depth

    @property
    def waiting(self) -> int:
        """Rows callers wait for while another caller computes them."""
        return sum(flight.waiters for flight in self._flights.values())

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
        if rows == 1 and self._shared is None:
            return await self._submit_one(inputs, deadline)
        started = time.perf_counter_ns()
        keys = [self._identity + raw for raw in row_bytes(inputs, rows)]
        now = self._clock()
        plan = _Plan([self.rows.get(key, now) for key in keys])
        for index, row in enumerate(plan.found):
            if row is not None:
                continue
            flight = self._flights.get(keys[index])
            if flight is None:
                plan.mine.append(index)
            else:
                plan.theirs.append((index, flight.join()))
        hits = rows - len(plan.mine) - len(plan.theirs)
        if hits == rows:
            self._count(hits, 0, started)
            return self._assemble(plan, rows)
        if plan.mine:
            flights = [self._fly(keys[i]) for i in plan.mine]
            if self._shared is not None:
                await self._from_shared(keys, plan, flights)
                hits = rows - len(plan.mine) - len(plan.theirs)
        self._count(hits, len(plan.mine), started)
        if plan.mine:
            await self._compute(inputs, rows, keys, plan, flights, deadline)
        for index, future in plan.theirs:
            # Shielded: cancelling this caller must not cancel the shared future.
            plan.found[index] = await asyncio.shield(future)
            self.counters.joined += 1
        return self._assemble(plan, rows)

    def peek(self, inputs: Mapping[str, np.ndarray]) -> Tensors | None:
        """A one-row request's outputs when its row is in memory; None otherwise.

        Called before validation: the key holds every input's name, datatype,
        shape and bytes, so a hit is a row that passed validation when it was
        stored. Inputs in another order than the signature's only miss.
        """
        first = next(iter(inputs.values()), None)
        if first is None or first.ndim == 0 or first.shape[0] != 1 or self._layout is None:
            return None
        started = time.perf_counter_ns()
        try:
            key = self._identity + one_row_bytes(inputs)
        except (ValueError, ServingError):
            return None  # not a well-formed batch of one: validation will say why
        row = self.rows.get(key, self._clock())
        if row is None:
            return None
        self._count(1, 0, started)
        return self._records(row, 1)

    async def _submit_one(self, inputs: Tensors, deadline: float | None) -> Tensors:
        """One row, memory only: the path most requests take, kept short."""
        started = time.perf_counter_ns()
        key = self._identity + one_row_bytes(inputs)
        row = self.rows.get(key, self._clock())
        if row is not None:
            self._count(1, 0, started)
            return self._records(row, 1)
        flight = self._flights.get(key)
        if flight is not None:
            self._count(0, 0, started)
            row = await asyncio.shield(flight.join())
            self.counters.joined += 1
            return self._records(row, 1)
        flight = self._flights[key] = _Flight()
        self._count(0, 1, started)
        try:
            outputs = await self.inner.submit(inputs, 1, deadline)
        except (asyncio.CancelledError, DeadlineExceeded):
            self._hand_over(inputs, [key], [flight])
            raise
        except Exception as exc:
            self._fail([key], [flight], exc)
            raise
        self._land(key, flight, self._rows_of(outputs, 1)[0], self._clock())
        return outputs

    async def _compute(
        self,
        inputs: Tensors,
        rows: int,
        keys: list[bytes],
        plan: _Plan,
        flights: list[_Flight],
        deadline: float | None,
    ) -> None:
        mine = plan.mine
        subset = inputs if len(mine) == rows else {n: a[mine] for n, a in inputs.items()}
        try:
            outputs = await self.inner.submit(subset, len(mine), deadline)
        except (asyncio.CancelledError, DeadlineExceeded):
            # This caller's own limit: the rows are still wanted by whoever waits.
            self._hand_over(subset, [keys[i] for i in mine], flights)
            raise
        except Exception as exc:
            self._fail([keys[i] for i in mine], flights, exc)
            raise
        now = self._clock()
        for position, row in enumerate(self._rows_of(outputs, len(mine))):
            index = mine[position]
            plan.found[index] = row
            self._land(keys[index], flights[position], row, now)
        plan.computed = outputs if len(mine) == rows else None

    def _rows_of(self, outputs: Tensors, count: int) -> list[Row]:
        """Each computed row as the bytes of one record of the layout."""
        spec = tuple((outputs[name].dtype, outputs[name].shape[1:]) for name in self._outputs)
        if self._layout is None:
            layout: np.dtype[np.void] = np.dtype(
                [
                    (name, dtype, shape)
                    for name, (dtype, shape) in zip(self._outputs, spec, strict=True)
                ]
            )
            self._layout, self._layout_text, self._spec = layout, repr(layout.descr), spec
        elif spec != self._spec:  # the registry caches only fixed output row shapes
            raise RuntimeFailure(f"outputs changed their layout: {spec} after {self._spec}")
        layout = self._layout
        if len(self._outputs) == 1:
            data = np.ascontiguousarray(outputs[self._outputs[0]]).tobytes()
        else:
            records = np.empty(count, layout)
            for name in self._outputs:
                records[name] = outputs[name]
            data = records.tobytes()
        size = layout.itemsize
        return [data[i * size : (i + 1) * size] for i in range(count)]

    def _fly(self, key: bytes) -> _Flight:
        flight = self._flights[key] = _Flight()
        return flight

    def _land(self, key: bytes, flight: _Flight, row: Row, now: float) -> None:
        self.rows.put(key, row, now)
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.settle(row)
        if self._shared is not None:
            self._shared.put_later(self._shared_key(key), self._encode(key, row), self._ttl)

    def _fail(self, keys: list[bytes], flights: list[_Flight], exc: BaseException) -> None:
        for key, flight in zip(keys, flights, strict=True):
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.settle(None, exc)

    def _hand_over(self, inputs: Tensors, keys: list[bytes], flights: list[_Flight]) -> None:
        waited = [i for i, f in enumerate(flights) if f.future is not None and not f.future.done()]
        for i, (key, flight) in enumerate(zip(keys, flights, strict=True)):
            if i not in waited and self._flights.get(key) is flight:
                del self._flights[key]
        if not waited:
            return
        subset = {n: a[waited] for n, a in inputs.items()}
        task = asyncio.get_running_loop().create_task(
            self._recompute(subset, [keys[i] for i in waited], [flights[i] for i in waited])
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _recompute(self, inputs: Tensors, keys: list[bytes], flights: list[_Flight]) -> None:
        try:
            outputs = await self.inner.submit(inputs, len(keys), None)
        except Exception as exc:
            self._fail(keys, flights, exc)
            return
        now = self._clock()
        for row, key, flight in zip(self._rows_of(outputs, len(keys)), keys, flights, strict=True):
            self._land(key, flight, row, now)

    async def _from_shared(self, keys: list[bytes], plan: _Plan, flights: list[_Flight]) -> None:
        assert self._shared is not None
        wanted = [keys[i] for i in plan.mine]
        values = await self._shared.mget([self._shared_key(k) for k in wanted])
        if values is None:
            return
        now = self._clock()
        still: list[int] = []
        left: list[_Flight] = []
        for index, key, flight, value in zip(plan.mine, wanted, flights, values, strict=True):
            row = self._decode(key, value) if value is not None else None
            if row is None:
                still.append(index)
                left.append(flight)
                continue
            plan.found[index] = row
            self.counters.shared_hits += 1
            self.rows.put(key, row, now)
            del self._flights[key]
            flight.settle(row)
        plan.mine[:] = still
        flights[:] = left

    def _shared_key(self, key: bytes) -> str:
        assert self._shared is not None
        return self._shared.key("cache", hashlib.sha256(key).hexdigest())

    def _count(self, hits: int, misses: int, started: int) -> None:
        elapsed = time.perf_counter_ns() - started
        counters = self.counters
        counters.hits += hits
        counters.misses += misses
        counters.lookup_ns += elapsed
        if hits:
            self._stats.cache_hit.add(elapsed if not misses else 0, hits)
        if misses:
            self._stats.cache_miss.add(elapsed, misses)

    def _assemble(self, plan: _Plan, rows: int) -> Tensors:
        if plan.computed is not None:  # every row computed by this call: its own outputs
            return plan.computed
        data = plan.found[0] if rows == 1 else b"".join(plan.found)  # type: ignore[arg-type]
        assert data is not None
        return self._records(data, rows)

    def _records(self, data: bytes, rows: int) -> Tensors:
        """Outputs as read-only views of row bytes: a caller cannot change a cached row."""
        assert self._layout is not None
        records = np.frombuffer(data, self._layout, count=rows)
        return {name: records[name] for name in self._outputs}

    def _encode(self, key: bytes, row: Row) -> bytes:
        """A Redis value: the layout, the full key and the row. Never pickle."""
        header = orjson.dumps([len(key), self._layout_text])
        return b"".join([header, b"\n", key, row])

    def _adopt(self, text: object) -> None:
        """Take the layout another replica wrote, when it fits this version's outputs."""
        try:
            descr = ast.literal_eval(text) if isinstance(text, str) else None
            layout: np.dtype[np.void] = np.dtype(descr)  # type: ignore[assignment]
        except (ValueError, TypeError, SyntaxError):
            return
        fields: Mapping[str, Any] = layout.fields or {}
        kinds = {fields[name][0].base.kind for name in fields}
        if tuple(fields) == self._outputs and kinds <= set("biuf"):
            self._layout, self._layout_text = layout, repr(layout.descr)

    def _decode(self, key: bytes, value: bytes) -> Row | None:
        """The row stored under ``key``; None unless the value is for this exact key and layout."""
        split = value.find(b"\n")
        try:
            length, layout = orjson.loads(value[:split])
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        start = split + 1
        if not isinstance(length, int) or value[start : start + length] != key:
            return None  # not this key: a hash collision
        if self._layout is None:
            self._adopt(layout)  # another replica computed it first
        if layout != self._layout_text:
            return None
        row = value[start + length :]
        assert self._layout is not None
        return row if len(row) == self._layout.itemsize else None

    async def close(self) -> None:
        """Let background recomputations finish, close the inner dispatcher, drop the rows."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.inner.close()
        self.rows.clear()
