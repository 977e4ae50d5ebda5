"""Admission on queueing delay, and large requests split for fairness (fake model and clock)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_batcher import FakeClock, FakeModel, executor, rows

from server.core.admission import FLOOR_S, DelayAdmission
from server.core.batcher import MicroBatcher
from server.core.dispatch import BatchRecord
from server.errors import Overloaded

__all__ = ["executor"]  # the fixture, shared with the batcher tests


async def one_turn() -> None:
    """One turn of the event loop: new tasks run to their first wait (no time passes)."""
    await asyncio.sleep(0)


def batcher_for(
    model: FakeModel,
    pool: ThreadPoolExecutor,
    records: list[BatchRecord],
    clock: FakeClock,
    target_s: float | None,
    slots: int = 1,
) -> MicroBatcher:
    batcher = MicroBatcher(
        model,
        pool,
        max_batch_size=16,
        max_queue_delay_s=0.0,
        max_queue_size=1000,
        max_batches_in_flight=slots,
        observer=records.append,
        clock=clock,
        target_queue_delay_s=target_s,
    )
    batcher.start()
    return batcher


def test_the_adaptive_target_follows_the_model() -> None:
    admission = DelayAdmission(slots=1, batching_delay_s=0.002)
    assert admission.target_s == FLOOR_S, "a fast model: the floor"
    for _ in range(50):
        admission.computed(0.010)  # a slow model: 10 ms batches
    assert admission.target_s == pytest.approx(0.002 + 4 * 0.010)


def test_a_request_predicted_to_wait_past_the_target_is_refused() -> None:
    admission = DelayAdmission(target_s=0.010, slots=2)
    assert admission.admits(10_000, 16), "nothing measured yet: nothing to predict from"
    admission.computed(0.004)
    assert admission.admits(64, 16)  # 4 batches of 4 ms over 2 slots: 8 ms
    assert not admission.admits(96, 16)  # 6 batches: 12 ms
    assert admission.refused == 1


async def test_requests_that_waited_past_the_target_are_refused_before_compute(
    executor: ThreadPoolExecutor,
) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = batcher_for(model, executor, records, clock, target_s=0.010)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()  # the model is busy with the first request
    queued = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(1, 4)]
    await one_turn()
    assert batcher.depth == 3
    # Requests had been waiting past the target for longer than CoDel's interval.
    batcher.admission.overdue(0.050, clock.now())
    clock.advance(0.200)  # the three have now waited 200 ms, over the 10 ms target
    model.gate.set()
    await first
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, Overloaded) for o in outcomes), outcomes
    assert "over the model's target of 10.0 ms" in str(outcomes[0])
    assert model.calls == 1, "the late requests were never computed"
    assert batcher.admission.dropped == 3
    await batcher.close()


def test_a_short_excursion_over_the_target_is_let_through() -> None:
    admission = DelayAdmission(target_s=0.010)
    assert not admission.overdue(0.030, now=100.0), "the first late one starts the interval"
    assert not admission.overdue(0.030, now=100.05)
    assert not admission.overdue(0.002, now=100.06), "back within the target"
    assert not admission.overdue(0.030, now=100.2), "a new interval starts"
    assert admission.overdue(0.030, now=100.31), "late for a whole interval: refused"
    assert admission.dropped == 1


async def test_excess_requests_are_refused_at_once_when_the_queue_would_hold_them_too_long(
    executor: ThreadPoolExecutor,
) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = batcher_for(model, executor, records, clock, target_s=0.010)
    batcher.admission.computed(0.004)  # as if measured: 4 ms a batch
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    accepted = [asyncio.create_task(batcher.submit(rows(i, 16), 16)) for i in range(1, 3)]
    await one_turn()
    assert batcher.depth == 2
    # Two full batches queued (8 ms), a third would make 12 ms: refused without waiting.
    with pytest.raises(Overloaded, match=r"would hold this request about 12\.0 ms"):
        await batcher.submit(rows(9, 16), 16)
    model.gate.set()
    await asyncio.gather(first, *accepted)
    assert [r.rows for r in records] == [1, 16, 16]
    await batcher.close()


async def test_admission_can_be_turned_off(executor: ThreadPoolExecutor) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = batcher_for(model, executor, records, clock, target_s=math.inf)
    batcher.admission.computed(10.0)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
    await model.wait_started()
    late = asyncio.create_task(batcher.submit(rows(1, 16), 16))
    await one_turn()
    assert batcher.depth == 1
    clock.advance(3600)
    model.gate.set()
    await asyncio.gather(first, late)
    await batcher.close()


async def test_a_huge_request_is_computed_in_pieces_with_others_in_between(
    executor: ThreadPoolExecutor,
) -> None:
    model, records, clock = FakeModel(), [], FakeClock()
    batcher = batcher_for(model, executor, records, clock, target_s=math.inf)
    big = rows(1, 10_000)  # pieces of SPLIT_ROWS (4,096)
    model.gate.clear()
    whole = asyncio.create_task(batcher.submit(big, 10_000))
    await model.wait_started()  # the first piece is being computed
    small = asyncio.create_task(batcher.submit(rows(2, 2), 2))
    await one_turn()
    assert batcher.depth == 1
    model.gate.set()
    result, _ = await asyncio.gather(whole, small)
    np.testing.assert_array_equal(result["y"], big["x"] * 2 + 1)
    assert result["s"].shape == (10_000,)
    assert [r.rows for r in records] == [4096, 2, 4096, 1808], "the small one got in"
    await batcher.close()
