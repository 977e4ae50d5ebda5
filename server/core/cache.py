"""The per-row result cache: a dispatcher wrapped around the version's batcher.

``CachedDispatcher`` keeps the dispatcher contract (``submit(inputs, rows,
deadline)``), so the service, the stats, drift and feedback see a cached answer
exactly as a computed one: it is still a prediction of that version. A
one-row request is first looked up before validation (``lookup``); on a miss
its key goes on to ``submit_one``, so a row's key is built once. How rows are held
and bounded is ``server.core.rowcache``.

Key and identity. A row's key is the version's identity (model, version, the
artifact's sha256, the key scheme) followed by the bytes of the row's
validated inputs (``server.core.rowkeys``: little-endian C-order values when
every input has a fixed row shape, else the canonical bytes that also name
each input, its datatype and shape). Each version has its own table, dropped
with it, so in memory the identity is the table and a key is the row's bytes
alone; Redis keys carry it. Entries hold every output of the row; the outputs
a request asks for are selected afterwards by the service, so they need not be
part of the key, and no request parameter changes outputs today (``timeout``
does not). The full key is the dictionary key, so two rows can only share an
entry when their bytes are equal: no hash collisions (Triton keys on a 64-bit
hash). Request ids are never part of it.

Shared work. Rows being computed are "in flight": a caller that wants one waits
for the first caller's computation instead of computing it again. A one-row
miss is tagged with its key, and the batcher hands a batch's tagged rows back
(``_landed``, the ``Tagging`` seam of ``server.core.dispatch``) where it sets
the results: one tobytes and one loop per batch store them and answer who
waits. Failures are not cached. When the computing caller is cancelled or
runs past its own deadline while others wait, the rows are computed again in
the background for them, so one caller's cancellation never takes an answer
from the others.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.core.dispatch import Dispatcher, Tagging, Tensors
from server.core.model_config import CacheConfig
from server.core.rowcache import CacheCounters, Row, RowLayout, RowLRU
from server.core.rowkeys import RowKeys
from server.core.signature import TensorSpec
from server.core.stats import VersionStats
from server.core.store import SharedStore
from server.errors import DeadlineExceeded, RuntimeFailure

__all__ = ["CacheCounters", "CachedDispatcher"]

log = logging.getLogger("sluice.cache")


@dataclass(slots=True)
class _Flight:
    """A row being computed that other callers wait for."""

    future: asyncio.Future[Row]
    waiters: int = 0

    def settle(self, row: Row | None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(row)  # type: ignore[arg-type]


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
        inputs: Sequence[TensorSpec] = (),
    ) -> None:
        self.inner = inner  # shadows call this directly: they never read or write the cache
        self.keys = RowKeys(inputs)
        # The key scheme is part of the identity: replicas keying rows another way never
        # read each other's entries in Redis.
        self._identity = f"{identity}{self.keys.scheme}\0".encode()
        self._ttl = config.ttl_s
        self._stats = stats
        self._shared = shared
        self._clock = clock
        self.counters = CacheCounters()
        self.rows = RowLRU(config, self.counters, clock)
        self.layout = RowLayout(outputs)
        # Rows being computed, by key; None until another caller waits for one. A row's
        # entry goes when it is stored, fails, or nobody waits for it any more.
        self._flights: dict[bytes, _Flight | None] = {}
        self._background: set[asyncio.Task[None]] = set()
        # A batcher stores the rows of one-row misses itself, a batch at a time (_landed).
        self._tagging = inner if isinstance(inner, Tagging) else None
        if self._tagging is not None:
            self._tagging.land_in(self._landed)

    @property
    def depth(self) -> int:
        return self.inner.depth

    @property
    def waiting(self) -> int:
        """Rows callers wait for while another caller computes them."""
        return sum(flight.waiters for flight in self._flights.values() if flight is not None)

    def lookup(self, inputs: Mapping[str, np.ndarray]) -> tuple[Tensors | None, bytes | None]:
        """A one-row request's outputs when its row is in memory, and the row's key.

        Called before validation: only a request already in its validated form
        has a key (``RowKeys.one``), so a hit is a row that passed validation
        when it was computed. The key is None for any other request; on a miss
        it goes to ``submit_one`` so that it is not built twice.
        """
        started = time.perf_counter_ns()
        key = self.keys.one(inputs)
        if key is None:
            return None, None
        row = self.rows.get(key)
        if row is None:
            self._missed(started)
            return None, key
        outputs = self.layout.records(row, 1)
        elapsed = time.perf_counter_ns() - started
        counters = self.counters
        counters.hits += 1
        counters.lookup_ns += elapsed
        self._stats.cache_hit.add(elapsed)
        return outputs, key

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
        """The rows' outputs, from memory, Redis or the inner dispatcher."""
        if rows == 1 and self._shared is None:
            return await self._submit_one(inputs, deadline, None)
        started = time.perf_counter_ns()
        keys = self.keys.rows(inputs, rows)
        now = self._clock()
        plan = _Plan([self.rows.get(key, now) for key in keys])
        for index, row in enumerate(plan.found):
            if row is not None:
                continue
            if keys[index] in self._flights:
                plan.theirs.append((index, self._join(keys[index])))
            else:
                plan.mine.append(index)
        hits = rows - len(plan.mine) - len(plan.theirs)
        if hits == rows:
            self._count(hits, 0, started)
            return self._assemble(plan, rows)
        if plan.mine:
            for index in plan.mine:
                self._flights[keys[index]] = None
            if self._shared is not None:
                await self._from_shared(keys, plan)
                hits = rows - len(plan.mine) - len(plan.theirs)
        self._count(hits, len(plan.mine), started)
        if plan.mine:
            await self._compute(inputs, rows, keys, plan, deadline)
        for index, future in plan.theirs:
            # Shielded: cancelling this caller must not cancel the shared future.
            plan.found[index] = await asyncio.shield(future)
            self.counters.joined += 1
        return self._assemble(plan, rows)

    def submit_one(self, inputs: Tensors, key: bytes, deadline: float | None) -> Awaitable[Tensors]:
        """``submit(inputs, 1, deadline)`` for a row ``lookup`` did not find under ``key``.

        A plain function handing back the coroutine: one frame less per miss.
        """
        if self._shared is not None:
            return self.submit(inputs, 1, deadline)
        return self._submit_one(inputs, deadline, key)

    async def _submit_one(
        self, inputs: Tensors, deadline: float | None, key: bytes | None
    ) -> Tensors:
        """One row, memory only: the path most requests take, kept short."""
        if key is None:
            started = time.perf_counter_ns()
            key = self.keys.rows(inputs, 1)[0]
            row = self.rows.get(key)  # rows are only held once the layout is known
            if row is not None:
                self._count(1, 0, started)
                return self.layout.records(row, 1)
            self._missed(started)
        flights = self._flights
        if key in flights:
            row = await asyncio.shield(self._join(key))
            self.counters.joined += 1
            return self.layout.records(row, 1)
        flights[key] = None
        self.counters.misses += 1
        self._stats.cache_miss.count += 1
        tagging = self._tagging
        try:
            if tagging is None:
                outputs = await self.inner.submit(inputs, 1, deadline)
            else:
                outputs = await tagging.submit(inputs, 1, deadline, key)
                if key not in flights:
                    return outputs  # stored by _landed where the batch's results were set
        except (asyncio.CancelledError, DeadlineExceeded):
            self._hand_over(inputs, [key])
            raise
        except Exception as exc:
            self._fail([key], exc)
            raise
        self._landed([(key, 0)], outputs)
        return outputs

    def _landed(self, tagged: list[tuple[bytes, int]], outputs: Tensors) -> None:
        """The batcher's landing (``Tagging``): ``_keep``, once per batch, where it sets
        the results. Never raises: the callers already have their answers."""
        try:
            self._keep(tagged, outputs)
        except RuntimeFailure as exc:
            log.error("rows not cached: %s", exc)

    def _keep(self, tagged: list[tuple[bytes, int]], outputs: Tensors) -> list[Row]:
        """Store computed rows, each a key and the offset of its row in ``outputs``.

        Raises RuntimeFailure, and fails whoever waits for the rows, when the outputs
        changed their layout.
        """
        try:
            data = self.layout.block(outputs)
        except RuntimeFailure as exc:
            self._fail([key for key, _ in tagged], exc)
            raise
        assert self.layout.dtype is not None
        size = self.layout.dtype.itemsize
        rows = [(key, data[offset * size : (offset + 1) * size]) for key, offset in tagged]
        self._store(rows)
        if self._shared is not None:
            for key, row in rows:
                self._write_shared(key, row)
        return [row for _, row in rows]

    def _store(self, rows: list[tuple[bytes, Row]]) -> None:
        """Keep rows in memory and answer whoever waits for them."""
        self.rows.put_many(rows, self._clock())
        flights = self._flights
        for key, row in rows:
            flight = flights.pop(key, None)
            if flight is not None:
                flight.settle(row)

    def _join(self, key: bytes) -> asyncio.Future[Row]:
        """The row under ``key`` that another caller is computing, once it is computed."""
        flight = self._flights[key]
        if flight is None:
            future = asyncio.get_running_loop().create_future()
            flight = self._flights[key] = _Flight(future)
        flight.waiters += 1
        return flight.future

    def _fail(self, keys: list[bytes], exc: BaseException) -> None:
        for key in keys:
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.settle(None, exc)

    def _hand_over(self, inputs: Tensors, keys: list[bytes]) -> None:
        """This caller's own limit ended its wait for ``keys`` (rows of ``inputs``): the
        rows others wait for are computed again for them, the rest are no longer in flight.

        A row already stored is no longer here, so nothing is computed twice for it.
        (Once stored, another caller's later flight for the same row could be: at worst
        that row is computed twice, never answered wrong.)
        """
        flights = self._flights
        waited = [i for i, key in enumerate(keys) if flights.get(key) is not None]
        for i, key in enumerate(keys):
            if i not in waited:
                flights.pop(key, None)
        if not waited:
            return
        subset = {n: a[waited] for n, a in inputs.items()}
        task = asyncio.get_running_loop().create_task(
            self._recompute(subset, [keys[i] for i in waited])
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _recompute(self, inputs: Tensors, keys: list[bytes]) -> None:
        try:
            outputs = await self.inner.submit(inputs, len(keys), None)
        except Exception as exc:
            self._fail(keys, exc)
            return
        self._landed([(key, offset) for offset, key in enumerate(keys)], outputs)

    async def _compute(
        self, inputs: Tensors, rows: int, keys: list[bytes], plan: _Plan, deadline: float | None
    ) -> None:
        mine = plan.mine
        subset = inputs if len(mine) == rows else {n: a[mine] for n, a in inputs.items()}
        wanted = [keys[i] for i in mine]
        try:
            outputs = await self.inner.submit(subset, len(mine), deadline)
        except (asyncio.CancelledError, DeadlineExceeded):
            # This caller's own limit: the rows are still wanted by whoever waits.
            self._hand_over(subset, wanted)
            raise
        except Exception as exc:
            self._fail(wanted, exc)
            raise
        computed = self._keep([(key, offset) for offset, key in enumerate(wanted)], outputs)
        for index, row in zip(mine, computed, strict=True):
            plan.found[index] = row
        plan.computed = outputs if len(mine) == rows else None

    def _write_shared(self, key: bytes, row: Row) -> None:
        assert self._shared is not None
        value = self.layout.encode(self._identity + key, row)
        self._shared.put_later(self._shared_key(key), value, self._ttl)

    async def _from_shared(self, keys: list[bytes], plan: _Plan) -> None:
        """The rows this caller would compute that Redis holds: found, kept in memory."""
        assert self._shared is not None
        wanted = [keys[i] for i in plan.mine]
        values = await self._shared.mget([self._shared_key(k) for k in wanted])
        if values is None:
            return
        still: list[int] = []
        found: list[tuple[bytes, Row]] = []
        for index, key, value in zip(plan.mine, wanted, values, strict=True):
            row = self.layout.decode(self._identity + key, value) if value is not None else None
            if row is None:
                still.append(index)
                continue
            plan.found[index] = row
            found.append((key, row))
        self.counters.shared_hits += len(found)
        self._store(found)
        plan.mine[:] = still

    def _shared_key(self, key: bytes) -> str:
        assert self._shared is not None
        return self._shared.key("cache", hashlib.sha256(self._identity + key).hexdigest())

    def _missed(self, started: int) -> None:
        """The time a lookup that found nothing in memory cost; the row is counted as a
        miss or as joined where it is computed or waited for."""
        elapsed = time.perf_counter_ns() - started
        self.counters.lookup_ns += elapsed
        self._stats.cache_miss.ns += elapsed

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
        return self.layout.records(data, rows)

    async def close(self) -> None:
        """Let background recomputations finish, close the inner dispatcher, drop the rows."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.inner.close()
        self.rows.clear()
