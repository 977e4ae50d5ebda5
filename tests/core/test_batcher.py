"""MicroBatcher and DirectDispatcher with a fake runtime and an injected clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import numpy as np
import pytest

from server.core.batcher import MicroBatcher
from server.core.dispatch import MONOTONIC, BatchRecord, Clock, DirectDispatcher
from server.errors import DeadlineExceeded, Overloaded, RuntimeFailure

P = ParamSpec("P")
T = TypeVar("T")


class FakeClock:
    """Time moves only when the test calls advance(); waits whose deadline it passes end then."""

    def __init__(self) -> None:
        self.time = 1000.0
        self._timers: list[tuple[float, asyncio.Future[None]]] = []
        self._waiting = asyncio.Event()

    def now(self) -> float:
        return self.time

    async def wait(self, event: asyncio.Event, deadline: float) -> bool:
        if event.is_set():
            return True
        if deadline <= self.time:
            return False
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, timer)
        self._timers.append(entry)
        self._waiting.set()
        setter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((setter, timer), return_when=asyncio.FIRST_COMPLETED)
            return setter.done()
        finally:
            setter.cancel()
            self._timers.remove(entry)
            if not self._timers:
                self._waiting.clear()

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for deadline, timer in self._timers:
            if deadline <= self.time and not timer.done():
                timer.set_result(None)

    async def someone_waits(self) -> None:
        await self._waiting.wait()


class WatchedPool(ThreadPoolExecutor):
    """A thread pool that tells the test how many jobs it has been handed."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.handed = 0
        self._changed = asyncio.Event()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.handed += 1  # run_in_executor hands jobs over on the event loop's thread
        self._changed.set()
        return super().submit(fn, *args, **kwargs)

    async def wait_handed(self, count: int) -> None:
        while self.handed < count:
            self._changed.clear()
            await self._changed.wait()


class FakeModel:
    """y = 2x + 1 per element, s = row sums; can be held shut to let a queue build up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.fail_on_value: float | None = None
        self.drop_a_row = False
        self.calls = 0

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.started.release()
        self.gate.wait(30)
        x = inputs["x"]
        if self.fail_on_value is not None and (x == self.fail_on_value).any():
            raise ValueError("poisoned batch")
        out = {"y": x * 2 + 1, "s": x.sum(axis=1)}
        if self.drop_a_row:
            out["y"] = out["y"][1:]
        return out

    async def wait_started(self) -> None:
        # Bounded: a failing test must not leave a thread blocked (the loop could not close).
        acquired = await asyncio.get_running_loop().run_in_executor(
            None, self.started.acquire, True, 30
        )
        assert acquired, "the model never started"


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def make_batcher(
    model: FakeModel,
    executor: ThreadPoolExecutor,
    records: list[BatchRecord],
    clock: FakeClock | None = None,
    **overrides: float,
) -> MicroBatcher:
    settings: dict[str, float] = {
        "max_batch_size": 16,
        "max_queue_delay_s": 3600.0,
        "max_queue_size": 1000,
        "max_batches_in_flight": 2,
    }
    settings.update(overrides)
    batcher = MicroBatcher(
        model,
        executor,
        max_batch_size=int(settings["max_batch_size"]),
        max_queue_delay_s=settings["max_queue_delay_s"],
        max_queue_size=int(settings["max_queue_size"]),
        max_batches_in_flight=int(settings["max_batches_in_flight"]),
        observer=records.append,
        clock=clock or FakeClock(),
    )
    batcher.start()
    return batcher


def rows(seed: int, n: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)}


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_batched_results_equal_unbatched_for_random_request_mixes(
    executor: ThreadPoolExecutor, seed: int
) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_queue_delay_s=0.0)
    rng = np.random.default_rng(seed)
    requests = [rows(seed * 1000 + i, int(rng.integers(1, 9))) for i in range(60)]
    model.gate.clear()  # let requests pile up so they must share batches
    tasks = [asyncio.create_task(batcher.submit(r, len(r["x"]))) for r in requests]
    await model.wait_started()
    model.gate.set()
    results = await asyncio.gather(*tasks)
    for request, result in zip(requests, results, strict=True):
        alone = model(request)
        np.testing.assert_array_equal(result["y"], alone["y"])
        np.testing.assert_array_equal(result["s"], alone["s"])
    assert sum(r.requests for r in records) == 60
    assert max(r.requests for r in records) > 1, "concurrent requests should share a batch"
    assert all(r.rows <= 16 for r in records), "a batch exceeded max_batch_size rows"
    await batcher.close()


async def test_request_larger_than_max_batch_runs_alone(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_batch_size=4)
    big = rows(1, 10)
    result = await batcher.submit(big, 10)
    np.testing.assert_array_equal(result["y"], big["x"] * 2 + 1)
    assert [(r.rows, r.requests) for r in records] == [(10, 1)]
    await batcher.close()


async def test_lone_request_is_not_held_for_the_queue_delay(executor: ThreadPoolExecutor) -> None:
    # The delay is an hour and the clock never moves: only an idle-model fast path answers.
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_queue_delay_s=3600.0)
    for i in range(3):
        result = await asyncio.wait_for(batcher.submit(rows(i, 1), 1), timeout=10)
        assert result["y"].shape == (1, 3)
    assert [r.requests for r in records] == [1, 1, 1]
    await batcher.close()


async def test_requests_arriving_while_busy_join_one_batch(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_queue_delay_s=3600.0)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    later = [asyncio.create_task(batcher.submit(rows(i, 2), 2)) for i in range(1, 4)]
    await asyncio.sleep(0)  # let the submits enqueue (not a wait for time)
    model.gate.set()
    await asyncio.gather(first, *later)
    assert [(r.requests, r.rows) for r in records] == [(1, 1), (3, 6)]
    await batcher.close()


async def test_full_queue_rejects_with_overloaded(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(
        model, executor, records, max_queue_size=3, max_batches_in_flight=1, max_batch_size=1
    )
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    tasks = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(1, 11)]
    await asyncio.sleep(0)  # each submit runs to its first await: rejection is immediate
    model.gate.set()
    outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
    rejected = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, dict)]
    assert rejected, "a full queue must shed load"
    assert "queue is full" in rejected[0].message
    assert len(served) + len(rejected) == 11
    assert len(served) >= 3, "requests that fit the queue are served"
    await batcher.close()


async def test_cancelled_callers_are_dropped_before_compute(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    # One slot: the later requests wait for the first batch instead of taking a second slot.
    batcher = make_batcher(model, executor, records, max_queue_delay_s=0.0, max_batches_in_flight=1)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    gone = asyncio.create_task(batcher.submit(rows(1, 5), 5))
    kept = asyncio.create_task(batcher.submit(rows(2, 2), 2))
    await asyncio.sleep(0)
    gone.cancel()
    model.gate.set()
    await asyncio.gather(first, kept)
    assert [r.rows for r in records] == [1, 2]
    await batcher.close()


async def test_expired_requests_fail_with_deadline_exceeded(executor: ThreadPoolExecutor) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = make_batcher(
        model, executor, records, clock=clock, max_queue_delay_s=0.0, max_batches_in_flight=1
    )
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    late = asyncio.create_task(batcher.submit(rows(1, 1), 1, deadline=clock.now() + 1))
    await asyncio.sleep(0)
    clock.advance(5)
    model.gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    await batcher.close()


async def test_model_error_fails_only_its_batch(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_queue_delay_s=0.0)
    model.fail_on_value = 99.0
    with pytest.raises(RuntimeFailure, match="poisoned batch"):
        await batcher.submit({"x": np.full((1, 3), 99.0, dtype=np.float32)}, 1)
    ok = await batcher.submit(rows(3, 2), 2)
    assert ok["y"].shape == (2, 3)
    await batcher.close()


async def test_wrong_output_row_count_is_a_runtime_failure(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    model.drop_a_row = True
    batcher = make_batcher(model, executor, records)
    with pytest.raises(RuntimeFailure, match="returned 2 rows"):
        await batcher.submit(rows(0, 3), 3)
    assert [(r.rows, r.requests, r.ok) for r in records] == [(3, 1, False)]
    await batcher.close()


async def test_close_finishes_queued_requests(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_queue_delay_s=0.0, max_batch_size=2)
    model.gate.clear()
    tasks = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(7)]
    await model.wait_started()
    closing = asyncio.create_task(batcher.close())
    model.gate.set()
    await closing
    assert all(t.done() and not t.exception() for t in tasks)


async def test_direct_dispatcher_bounds_requests_in_flight(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    direct = DirectDispatcher(model, executor, max_pending=2, observer=records.append)
    model.gate.clear()
    running = [asyncio.create_task(direct.submit(rows(i, 1), 1)) for i in range(2)]
    await model.wait_started()
    with pytest.raises(Overloaded):
        await direct.submit(rows(5, 1), 1)
    model.gate.set()
    await asyncio.gather(*running)
    assert [r.requests for r in records] == [1, 1]


async def test_a_batch_that_fills_leaves_without_waiting_out_the_delay(
    executor: ThreadPoolExecutor,
) -> None:
    # Two slots and an hour's delay on a clock that never moves: while the first batch
    # runs, the second only starts because it reached max_batch_size rows.
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_batch_size=6, max_batches_in_flight=2)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    fillers = [asyncio.create_task(batcher.submit(rows(i, 2), 2)) for i in range(1, 4)]
    await asyncio.wait_for(model.wait_started(), timeout=10)  # the full batch began
    assert batcher.depth == 0
    model.gate.set()
    await asyncio.gather(first, *fillers)
    assert sorted((r.requests, r.rows) for r in records) == [(1, 1), (3, 6)]
    await batcher.close()


async def test_a_partial_batch_leaves_when_the_queue_delay_is_over(
    executor: ThreadPoolExecutor,
) -> None:
    # A 20 ms delay on a fake clock: with the first batch still running, the second
    # (one request, far from full) is held for more requests until the test moves the
    # clock past its delay, then starts in the free slot.
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = make_batcher(
        model,
        executor,
        records,
        clock=clock,
        max_batch_size=64,
        max_queue_delay_s=0.02,
        max_batches_in_flight=2,
    )
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    second = asyncio.create_task(batcher.submit(rows(1, 3), 3))
    await asyncio.wait_for(clock.someone_waits(), timeout=10)
    assert model.calls == 1, "the partial batch left before its delay was over"
    clock.advance(0.02)
    await asyncio.wait_for(model.wait_started(), timeout=10)
    model.gate.set()
    await asyncio.gather(first, second)
    assert sorted((r.requests, r.rows) for r in records) == [(1, 1), (1, 3)]
    await batcher.close()


async def test_submit_after_close_is_refused(executor: ThreadPoolExecutor) -> None:
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records)
    await batcher.submit(rows(0, 1), 1)
    await batcher.close()
    with pytest.raises(RuntimeFailure, match="not running"):
        await batcher.submit(rows(1, 1), 1)


async def test_close_answers_a_request_held_for_the_only_slot(
    executor: ThreadPoolExecutor,
) -> None:
    # The lone first request holds the one slot; the loop takes the next request and waits
    # for that slot. close() must see it through, not stop the loop under it.
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records, max_batches_in_flight=1)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    held = asyncio.create_task(batcher.submit(rows(1, 2), 2))
    closing = asyncio.create_task(batcher.close())
    model.gate.set()
    await asyncio.wait_for(closing, timeout=10)
    assert first.done(), "close() returned before every caller was answered"
    assert held.done(), "close() returned before every caller was answered"
    np.testing.assert_array_equal(held.result()["y"], rows(1, 2)["x"] * 2 + 1)
    assert [(r.requests, r.rows, r.ok) for r in records] == [(1, 1, True), (1, 2, True)]


async def test_close_does_not_wait_out_the_queue_delay_of_a_forming_batch(
    executor: ThreadPoolExecutor,
) -> None:
    # An hour's delay on a clock that never moves: the batch forming behind the running one
    # leaves as soon as the model is free, and close() returns once it is answered.
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = make_batcher(model, executor, records, clock=clock, max_queue_delay_s=3600.0)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    forming = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(1, 4)]
    await asyncio.wait_for(clock.someone_waits(), timeout=10)
    closing = asyncio.create_task(batcher.close())
    model.gate.set()
    await asyncio.wait_for(closing, timeout=10)
    assert all(t.done() and not t.exception() for t in [first, *forming])
    assert [(r.requests, r.rows) for r in records] == [(1, 1), (3, 3)]


def make_direct(
    model: FakeModel,
    executor: ThreadPoolExecutor,
    records: list[BatchRecord],
    clock: Clock | None = None,
) -> DirectDispatcher:
    return DirectDispatcher(
        model, executor, max_pending=10, observer=records.append, clock=clock or FakeClock()
    )


async def test_direct_dispatcher_refuses_a_request_already_past_its_deadline(
    executor: ThreadPoolExecutor,
) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    direct = make_direct(model, executor, records, clock)
    with pytest.raises(DeadlineExceeded, match="before compute started"):
        await direct.submit(rows(0, 1), 1, deadline=clock.now() - 1)
    assert model.calls == 0
    assert records == [], "no model execution happened, so none is recorded"
    assert direct.depth == 0


async def test_direct_dispatcher_deadline_passes_while_waiting_for_a_thread() -> None:
    # One inference thread, busy with the first request: the second waits in the pool's
    # queue, and its deadline passes there. It fails without running the model.
    model, records, clock = FakeModel(), [], FakeClock()
    pool = WatchedPool(1)
    try:
        direct = make_direct(model, pool, records, clock)
        model.gate.clear()
        first = asyncio.create_task(direct.submit(rows(0, 1), 1))
        await model.wait_started()
        late = asyncio.create_task(direct.submit(rows(1, 1), 1, deadline=clock.now() + 1))
        await asyncio.wait_for(pool.wait_handed(2), timeout=10)  # accepted, queued
        clock.advance(5)
        model.gate.set()
        assert (await first)["y"].shape == (1, 3)
        with pytest.raises(DeadlineExceeded):
            await late
        assert model.calls == 1
        assert [(r.requests, r.ok) for r in records] == [(1, True)]
        assert direct.depth == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


async def test_direct_dispatcher_runs_requests_within_their_deadline(
    executor: ThreadPoolExecutor,
) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    direct = make_direct(model, executor, records, clock)
    for deadline in (None, clock.now() + 1, clock.now()):
        request = rows(7, 2)
        result = await direct.submit(request, 2, deadline=deadline)
        np.testing.assert_array_equal(result["y"], request["x"] * 2 + 1)
    assert [r.ok for r in records] == [True, True, True]


async def test_direct_dispatcher_wrong_output_row_count_records_one_failure(
    executor: ThreadPoolExecutor,
) -> None:
    model, records = FakeModel(), []
    model.drop_a_row = True
    direct = make_direct(model, executor, records)
    with pytest.raises(RuntimeFailure, match="returned 2 rows"):
        await direct.submit(rows(0, 3), 3)
    assert [(r.rows, r.requests, r.ok) for r in records] == [(3, 1, False)]
    assert direct.depth == 0


async def test_default_clock_reads_deadlines_as_monotonic_time(
    executor: ThreadPoolExecutor,
) -> None:
    # Callers pass no clock and compute deadlines as time.monotonic() + timeout.
    model, records = FakeModel(), []
    direct = DirectDispatcher(model, executor, 10, observer=records.append)
    batcher = MicroBatcher(
        model,
        executor,
        max_batch_size=16,
        max_queue_delay_s=0.0,
        max_queue_size=10,
        max_batches_in_flight=1,
        observer=records.append,
    )
    batcher.start()
    for dispatcher in (direct, batcher):
        with pytest.raises(DeadlineExceeded):
            await dispatcher.submit(rows(0, 1), 1, deadline=time.monotonic() - 1)
        result = await dispatcher.submit(rows(1, 1), 1, deadline=time.monotonic() + 3600)
        assert result["y"].shape == (1, 3)
    assert model.calls == 2
    await batcher.close()


async def test_monotonic_clock_wait_reports_set_or_deadline_passed() -> None:
    event = asyncio.Event()
    assert await MONOTONIC.wait(event, time.monotonic() - 1) is False
    event.set()
    assert await MONOTONIC.wait(event, time.monotonic() + 3600) is True


async def test_a_batch_hands_its_tagged_rows_to_the_landing_once(
    executor: ThreadPoolExecutor,
) -> None:
    """What the result cache relies on: one call per batch, with each tagged request's
    tag and the offset of its row in the batch's outputs; untagged requests are not in it."""
    model, records = FakeModel(), []
    batcher = make_batcher(model, executor, records)
    landed: list[tuple[list[tuple[bytes, int]], dict[str, np.ndarray]]] = []
    batcher.land_in(lambda tagged, outputs: landed.append((tagged, outputs)))
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1, tag=b"alone"))
    await model.wait_started()
    untagged = asyncio.create_task(batcher.submit(rows(1, 2), 2))
    tagged = [asyncio.create_task(batcher.submit(rows(i, 1), 1, tag=b"t%d" % i)) for i in (3, 4)]
    await asyncio.sleep(0)  # let the submits enqueue (not a wait for time)
    model.gate.set()
    results = await asyncio.gather(first, untagged, *tagged)
    assert [(r.requests, r.rows) for r in records] == [(1, 1), (3, 4)]
    assert [t for t, _ in landed] == [[(b"alone", 0)], [(b"t3", 2), (b"t4", 3)]]
    batch = landed[1][1]
    for (_, offset), result in zip(landed[1][0], results[2:], strict=True):
        np.testing.assert_array_equal(batch["y"][offset : offset + 1], result["y"])
    await batcher.close()
