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

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from server.core.batcher import Dispatcher, Tensors
from server.core.model_config import CacheConfig
from server.core.stats import VersionStats
from server.core.store import SharedStore
from server.core.tensors import row_bytes
from server.errors import DeadlineExceeded

log = logging.getLogger("sluice.cache")

Row = tuple[np.ndarray, ...]  # one row of every output, in the signature's order
# Per entry beyond its key and arrays: the OrderedDict slot, the entry, the tuple and
# one ndarray header per output (measured with tracemalloc on a 1-output model: ~330 B).
ENTRY_OVERHEAD = 240
ARRAY_OVERHEAD = 112


@dataclass(slots=True)
class CacheCounters:
    """What the metrics export; rows, not requests (the cache is per row)."""

    hits: int = 0  # rows answered from memory or Redis
    shared_hits: int = 0  # of those, answered from Redis
    misses: int = 0  # rows computed
    joined: int = 0  # rows that waited for another caller's computation
    evictions: int = 0
    lookup_ns: int = 0


@dataclass(slots=True)
class _Entry:
    row: Row
    nbytes: int
    expires: float


class RowLRU:
    """Rows by full key, bounded in entries and bytes, least recently used out first."""

    def __init__(
        self, config: CacheConfig, counters: CacheCounters, clock: Callable[[], float]
    ) -> None:
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._ttl = config.ttl_s
        self._counters = counters
        self._clock = clock
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Row | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.row

    def put(self, key: bytes, row: Row, now: float) -> None:
        if key in self._entries:
            self._drop(key)
        nbytes = len(key) + ENTRY_OVERHEAD + sum(a.nbytes + ARRAY_OVERHEAD for a in row)
        if nbytes > self._max_bytes:
            return
        self._entries[key] = _Entry(row, nbytes, now + self._ttl)
        self.bytes += nbytes
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self._counters.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).nbytes


@dataclass(slots=True)
class _Flight:
    """A row being computed; others may wait on its future."""

    future: asyncio.Future[Row]
    waiters: int = 0


@dataclass(slots=True)
class _Plan:
    """How one request's rows are answered."""

    found: list[Row | None]
    mine: list[int] = field(default_factory=list)  # rows this caller computes
    theirs: list[tuple[int, _Flight]] = field(default_factory=list)  # rows others compute


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

    @property
    def depth(self) -> int:
        return self.inner.depth

    @property
    def waiting(self) -> int:
        """Rows callers wait for while another caller computes them."""
        return sum(flight.waiters for flight in self._flights.values())

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
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
                flight.waiters += 1
                plan.theirs.append((index, flight))
        hits = rows - len(plan.mine) - len(plan.theirs)
        if hits == rows:
            self._count(hits, 0, started)
            return self._assemble(plan.found, rows)
        if plan.mine:
            flights = [self._fly(keys[i]) for i in plan.mine]
            if self._shared is not None:
                await self._from_shared(keys, plan, flights)
                hits = rows - len(plan.mine) - len(plan.theirs)
        self._count(hits, len(plan.mine), started)
        if plan.mine:
            await self._compute(inputs, rows, keys, plan, flights, deadline)
        for index, flight in plan.theirs:
            # Shielded: cancelling this caller must not cancel the shared future.
            plan.found[index] = await asyncio.shield(flight.future)
            self.counters.joined += 1
        return self._assemble(plan.found, rows)

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
        columns = [outputs[name] for name in self._outputs]
        for position, index in enumerate(mine):
            row = tuple(_own_row(column, position) for column in columns)
            plan.found[index] = row
            self._land(keys[index], flights[position], row, now)

    def _fly(self, key: bytes) -> _Flight:
        flight = _Flight(asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        return flight

    def _land(self, key: bytes, flight: _Flight, row: Row, now: float) -> None:
        self.rows.put(key, row, now)
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.waiters and not flight.future.done():
            flight.future.set_result(row)
        if self._shared is not None:
            self._shared.put_later(self._shared_key(key), _encode(key, row), self._ttl)

    def _fail(self, keys: list[bytes], flights: list[_Flight], exc: BaseException) -> None:
        for key, flight in zip(keys, flights, strict=True):
            if self._flights.get(key) is flight:
                del self._flights[key]
            if flight.waiters and not flight.future.done():
                flight.future.set_exception(exc)

    def _hand_over(self, inputs: Tensors, keys: list[bytes], flights: list[_Flight]) -> None:
        waited = [i for i, f in enumerate(flights) if f.waiters and not f.future.done()]
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
        columns = [outputs[name] for name in self._outputs]
        for position, (key, flight) in enumerate(zip(keys, flights, strict=True)):
            self._land(key, flight, tuple(_own_row(c, position) for c in columns), now)

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
            row = _decode(key, value, len(self._outputs)) if value is not None else None
            if row is None:
                still.append(index)
                left.append(flight)
                continue
            plan.found[index] = row
            self.counters.shared_hits += 1
            self.rows.put(key, row, now)
            del self._flights[key]
            if flight.waiters:
                flight.future.set_result(row)
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

    def _assemble(self, found: list[Row | None], rows: int) -> Tensors:
        if rows == 1:
            row = found[0]
            assert row is not None
            return dict(zip(self._outputs, row, strict=True))
        complete = [r for r in found if r is not None]
        assert len(complete) == rows
        return {
            name: np.concatenate([r[j] for r in complete]) for j, name in enumerate(self._outputs)
        }

    async def close(self) -> None:
        """Let background recomputations finish, close the inner dispatcher, drop the rows."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.inner.close()
        self.rows.clear()


def _own_row(column: np.ndarray, position: int) -> np.ndarray:
    """One row as its own read-only array (a slice would keep the whole batch alive)."""
    row = np.array(column[position : position + 1])
    row.flags.writeable = False
    return row


def _encode(key: bytes, row: Row) -> bytes:
    """A Redis value: the full key and each output's dtype, shape and bytes. Never pickle."""
    header = orjson.dumps([len(key), [[a.dtype.str, list(a.shape)] for a in row]])
    return b"".join([header, b"\n", key, *(np.ascontiguousarray(a).tobytes() for a in row)])


def _decode(key: bytes, value: bytes, outputs: int) -> Row | None:
    """The row stored under ``key``, or None when the value is not for this exact key."""
    try:
        split = value.index(b"\n")
        length, specs = orjson.loads(value[:split])
        start = split + 1
        if len(specs) != outputs or value[start : start + length] != key:
            return None
        offset = start + length
        row = []
        for dtype_str, shape in specs:
            dtype = np.dtype(dtype_str)
            size = int(np.prod(shape)) * dtype.itemsize
            array = np.frombuffer(value, dtype, count=int(np.prod(shape)), offset=offset)
            array = array.reshape(shape)
            offset += size
            row.append(array)
        if offset != len(value):
            return None
        return tuple(row)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        log.warning("ignored a malformed shared cache entry")
        return None
