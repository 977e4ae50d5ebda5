"""Batches measured cheaper than the thread hand-off run on the event loop; others never do."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.core.batcher import MicroBatcher
from server.core.dispatch import DirectDispatcher
from server.core.runtimes.base import ExecutorTiming
from server.core.runtimes.hybrid import INLINE_BUDGET_US, inline_rows


class ThreadRecorder:
    """A fake model that notes which thread ran each batch."""

    def __init__(self) -> None:
        self.threads: list[tuple[int, int]] = []  # (rows, thread id)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = inputs["x"].shape[0]
        self.threads.append((rows, threading.get_ident()))
        return {"y": inputs["x"][:, 0] * 2}


def rows(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2)}


def started_batcher(model: ThreadRecorder, pool: ThreadPoolExecutor, inline: int) -> MicroBatcher:
    batcher = MicroBatcher(
        model,
        pool,
        max_batch_size=64,
        max_queue_delay_s=0.001,
        max_queue_size=64,
        max_batches_in_flight=1,
        inline_rows=inline,
    )
    batcher.start()
    return batcher


@pytest.mark.parametrize("kind", ["batcher", "direct"])
async def test_small_batches_run_on_the_loop_and_large_ones_in_the_pool(kind: str) -> None:
    model = ThreadRecorder()
    with ThreadPoolExecutor(1) as pool:
        dispatcher: MicroBatcher | DirectDispatcher
        if kind == "batcher":
            dispatcher = started_batcher(model, pool, inline=2)
        else:
            dispatcher = DirectDispatcher(model, pool, 16, inline_rows=2)
        for n in (1, 2, 3):
            out = await dispatcher.submit(rows(n), n)
            np.testing.assert_array_equal(out["y"], rows(n)["x"][:, 0] * 2)
        await dispatcher.close()
    loop_thread = threading.get_ident()
    ran = dict(model.threads)
    assert ran[1] == loop_thread
    assert ran[2] == loop_thread
    assert ran[3] != loop_thread


def test_only_calls_within_the_budget_qualify() -> None:
    timings = (
        ExecutorTiming("compiled", 1, 7.0),
        ExecutorTiming("xgboost", 1, 70.0),
        ExecutorTiming("compiled", 2, INLINE_BUDGET_US),
        ExecutorTiming("compiled", 4, INLINE_BUDGET_US + 1),
    )
    assert inline_rows(timings) == 2
    assert inline_rows((ExecutorTiming("compiled", 1, INLINE_BUDGET_US * 3),)) == 0


async def test_requests_arriving_together_form_one_batch_when_computed_on_the_loop() -> None:
    # The first finds the batcher idle and would compute alone at once; the others, read
    # in the same loop iteration, must join one batch behind it, not compute one by one.
    model = ThreadRecorder()
    with ThreadPoolExecutor(1) as pool:
        batcher = started_batcher(model, pool, inline=1)
        bodies = [{"x": np.full((1, 2), i, dtype=np.float32)} for i in range(16)]
        outs = await asyncio.gather(*(batcher.submit(b, 1) for b in bodies))
        await batcher.close()
    for body, out in zip(bodies, outs, strict=True):
        np.testing.assert_array_equal(out["y"], body["x"][:, 0] * 2)
    assert [n for n, _ in model.threads] == [1, 15]
