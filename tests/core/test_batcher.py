"""MicroBatcher and DirectDispatcher with a fake runtime and an injected clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.core.batcher import BatchRecord, DirectDispatcher, MicroBatcher
from server.errors import DeadlineExceeded, Overloaded, RuntimeFailure


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """y = 2x + 1 per element, s = row sums; can be held shut to let a queue build up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.fail_on_value: float | None = None
        self.drop_a_row = False

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        await asyncio.get_running_loop().run_in_executor(None, self.started.acquire)


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
    late = asyncio.create_task(batcher.submit(rows(1, 1), 1, deadline=clock.now + 1))
    await asyncio.sleep(0)
    clock.now += 5
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
    # A real clock and a 20 ms delay: with the first batch still running, the second
    # (one request, far from full) starts once its delay is over, in the free slot.
    model, records = FakeModel(), []
    batcher = MicroBatcher(
        model,
        executor,
        max_batch_size=64,
        max_queue_delay_s=0.02,
        max_queue_size=100,
        max_batches_in_flight=2,
        observer=records.append,
    )
    batcher.start()
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    second = asyncio.create_task(batcher.submit(rows(1, 3), 3))
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
