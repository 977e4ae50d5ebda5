"""The per-row result cache around a fake dispatcher: identity, shared work, bounds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from server.core.cache import CachedDispatcher
from server.core.dispatch import Tensors
from server.core.model_config import CacheConfig
from server.core.stats import VersionStats
from server.errors import DeadlineExceeded, RuntimeFailure


@dataclass
class FakeDispatcher:
    """y = 2x + 1 per row and its row sum; every call recorded; optionally gated."""

    calls: list[int] = field(default_factory=list)  # rows per call
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    fail_next: BaseException | None = None
    depth: int = 0

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
        self.calls.append(rows)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        x = inputs["x"]
        assert x.shape[0] == rows
        return {"y": x * 2 + 1, "total": x.sum(axis=1)}

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached(inner: FakeDispatcher, clock: Clock | None = None, **config: float) -> CachedDispatcher:
    return CachedDispatcher(
        inner,
        "m\0001\0sha\0",
        ["y", "total"],
        CacheConfig(enabled=True, **config),  # type: ignore[arg-type]
        VersionStats(),
        clock=clock or Clock(),
    )


def rows(start: int, count: int) -> Tensors:
    values = np.arange(start * 3, (start + count) * 3, dtype=np.float32).reshape(count, 3)
    return {"x": values / 7}


async def joined(cache: CachedDispatcher) -> None:
    """Until a second caller waits on a row in flight (bounded, no timing)."""
    async with asyncio.timeout(5):
        while not cache.waiting:  # noqa: ASYNC110 (a loop turn per check of public state)
            await asyncio.sleep(0)


def assert_same(got: Tensors, want: Tensors) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


async def test_a_repeated_request_is_answered_from_memory_bit_for_bit() -> None:
    inner = FakeDispatcher()
    cache = cached(inner)
    first = await cache.submit(rows(0, 1), 1)
    again = await cache.submit(rows(0, 1), 1)
    assert inner.calls == [1]
    assert_same(again, await FakeDispatcher().submit(rows(0, 1), 1))
    assert_same(again, first)
    assert cache.counters.hits == 1
    assert cache.counters.misses == 1


async def test_only_unseen_rows_are_computed_and_the_answer_equals_computing_all() -> None:
    inner = FakeDispatcher()
    cache = cached(inner)
    await cache.submit(rows(0, 32), 32)
    mixed = {"x": np.concatenate([rows(0, 32)["x"], rows(100, 32)["x"]])}
    answer = await cache.submit(mixed, 64)
    assert inner.calls == [32, 32], "the second call computed only the 32 new rows"
    assert_same(answer, await FakeDispatcher().submit(mixed, 64))


async def test_rows_repeated_within_one_request_are_keyed_alike() -> None:
    inner = FakeDispatcher()
    cache = cached(inner)
    await cache.submit(rows(5, 1), 1)
    twice = {"x": np.concatenate([rows(5, 1)["x"], rows(6, 1)["x"], rows(5, 1)["x"]])}
    answer = await cache.submit(twice, 3)
    assert inner.calls == [1, 1]
    assert_same(answer, await FakeDispatcher().submit(twice, 3))


async def test_concurrent_identical_rows_share_one_computation() -> None:
    inner = FakeDispatcher(gate=asyncio.Event())
    cache = cached(inner)
    tasks = [asyncio.create_task(cache.submit(rows(0, 2), 2)) for _ in range(10)]
    await inner.entered.wait()
    inner.gate.set()  # type: ignore[union-attr]
    answers = await asyncio.gather(*tasks)
    assert inner.calls == [2]
    for answer in answers:
        assert_same(answer, answers[0])
    assert cache.counters.joined == 18


async def test_failures_are_shared_but_never_cached() -> None:
    inner = FakeDispatcher(gate=asyncio.Event(), fail_next=RuntimeFailure("model broke"))
    cache = cached(inner)
    first = asyncio.create_task(cache.submit(rows(0, 1), 1))
    await inner.entered.wait()
    second = asyncio.create_task(cache.submit(rows(0, 1), 1))
    inner.gate.set()  # type: ignore[union-attr]
    for task in (first, second):
        with pytest.raises(RuntimeFailure, match="model broke"):
            await task
    answer = await cache.submit(rows(0, 1), 1)
    assert inner.calls == [1, 1], "the failure was not kept: the next call computed"
    assert_same(answer, await FakeDispatcher().submit(rows(0, 1), 1))


async def test_a_cancelled_caller_does_not_take_the_answer_from_those_waiting() -> None:
    inner = FakeDispatcher(gate=asyncio.Event())
    cache = cached(inner)
    computing = asyncio.create_task(cache.submit(rows(0, 1), 1))
    await inner.entered.wait()
    waiting = asyncio.create_task(cache.submit(rows(0, 1), 1))
    await joined(cache)
    computing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await computing
    inner.gate.set()  # type: ignore[union-attr]
    answer = await waiting
    assert_same(answer, await FakeDispatcher().submit(rows(0, 1), 1))
    assert not waiting.cancelled()


async def test_a_caller_past_its_deadline_hands_the_rows_to_those_waiting() -> None:
    inner = FakeDispatcher(gate=asyncio.Event(), fail_next=DeadlineExceeded("late"))
    cache = cached(inner)
    hurried = asyncio.create_task(cache.submit(rows(0, 1), 1, deadline=1.0))
    await inner.entered.wait()
    patient = asyncio.create_task(cache.submit(rows(0, 1), 1))
    await joined(cache)
    inner.gate.set()  # type: ignore[union-attr]
    with pytest.raises(DeadlineExceeded):
        await hurried
    assert_same(await patient, await FakeDispatcher().submit(rows(0, 1), 1))
    assert inner.calls == [1, 1], "computed again for the patient caller"


async def test_entries_and_bytes_stay_bounded_under_a_flood_of_distinct_rows() -> None:
    inner = FakeDispatcher()
    cache = cached(inner, max_entries=500, max_bytes=10**9)
    for start in range(0, 5000, 50):
        await cache.submit(rows(start, 50), 50)
    assert len(cache.rows) == 500
    assert cache.counters.evictions == 4500
    small = cached(FakeDispatcher(), max_entries=10**6, max_bytes=64 * 1024)
    for start in range(0, 5000, 50):
        await small.submit(rows(start, 50), 50)
    assert 0 < small.rows.bytes <= 64 * 1024
    assert len(small.rows) < 5000


async def test_the_least_recently_used_row_goes_first() -> None:
    inner = FakeDispatcher()
    cache = cached(inner, max_entries=2)
    await cache.submit(rows(0, 1), 1)
    await cache.submit(rows(1, 1), 1)
    await cache.submit(rows(0, 1), 1)  # row 0 is now the most recent
    await cache.submit(rows(2, 1), 1)  # evicts row 1
    inner.calls.clear()
    await cache.submit(rows(0, 1), 1)
    await cache.submit(rows(1, 1), 1)
    assert inner.calls == [1]


async def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    inner = FakeDispatcher()
    cache = cached(inner, clock, ttl_s=60)
    await cache.submit(rows(0, 1), 1)
    clock.now += 59
    await cache.submit(rows(0, 1), 1)
    clock.now += 2
    await cache.submit(rows(0, 1), 1)
    assert inner.calls == [1, 1]


async def test_cached_rows_cannot_be_changed_by_a_caller() -> None:
    cache = cached(FakeDispatcher())
    await cache.submit(rows(0, 1), 1)
    answer = await cache.submit(rows(0, 1), 1)
    with pytest.raises(ValueError, match="read-only"):
        answer["y"][0, 0] = 42.0


@dataclass
class OneOutput:
    """A model with one output of two values per row: rows held without a record."""

    calls: list[int] = field(default_factory=list)
    depth: int = 0

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
        self.calls.append(rows)
        x = inputs["x"]
        return {"pair": np.stack([x.sum(axis=1), x.max(axis=1)], axis=1).astype(np.float64)}

    async def close(self) -> None:
        pass


async def test_a_looked_up_one_row_request_is_computed_once_and_found_after() -> None:
    inner = FakeDispatcher()
    cache = cached(inner)
    outputs, key = cache.lookup(rows(3, 1))
    assert outputs is None
    assert key is not None
    computed = await cache.submit_one(rows(3, 1), key, None)
    found, again = cache.lookup(rows(3, 1))
    assert found is not None
    assert again == key
    assert_same(found, computed)
    assert_same(await cache.submit(rows(2, 3), 3), await FakeDispatcher().submit(rows(2, 3), 3))
    assert inner.calls == [1, 2], "a batch holding the looked-up row did not compute it again"
    assert (cache.counters.hits, cache.counters.misses) == (2, 3)


async def test_a_batch_is_not_looked_up_as_one_row() -> None:
    cache = cached(FakeDispatcher())
    await cache.submit(rows(0, 2), 2)
    assert cache.lookup(rows(0, 2)) == (None, None)


async def test_rows_of_a_single_output_come_back_with_their_shape_and_dtype() -> None:
    inner = OneOutput()
    cache = CachedDispatcher(
        inner, "m\0001\0sha\0", ["pair"], CacheConfig(enabled=True), VersionStats(), clock=Clock()
    )
    batch = rows(0, 4)
    computed = await cache.submit(batch, 4)
    single, _ = cache.lookup(rows(1, 1))
    again = await cache.submit(batch, 4)
    assert inner.calls == [4]
    assert_same(again, computed)
    assert single is not None
    assert_same(single, await OneOutput().submit(rows(1, 1), 1))
    assert single["pair"].shape == (1, 2)
    assert not again["pair"].flags.writeable
