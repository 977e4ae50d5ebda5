"""Shadow copies off the serving path: batched per version, in a thread of their own."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from server.core.catalog import VersionState
from server.core.dispatch import DirectDispatcher
from server.core.model_config import ModelConfig
from server.core.registry import ModelVersion
from server.core.rollout import Rollout
from server.core.routing import Copy, Reason, Route
from server.core.service import InferenceRequest, InferenceResult

CONFIG = ModelConfig.model_validate(
    {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
    }
)


class Runtime:
    """p = first feature; ``gate`` (when given) holds every call until it is set."""

    platform = "test"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def predict(self, inputs: Any) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(30)
        rows = inputs["x"]
        self.calls.append(rows.shape[0])
        return {"p": rows[:, 0].astype(np.float32)}

    def close(self) -> None:
        pass


def version(number: int, runtime: Runtime) -> ModelVersion:
    mv = ModelVersion("m", number, CONFIG, CONFIG.signature(), VersionState.READY)
    mv.runtime = runtime  # type: ignore[assignment]
    return mv


def request(value: float) -> InferenceRequest:
    return InferenceRequest("m", {"x": np.array([[value, 0.0]], dtype=np.float32)})


def answer(mv: ModelVersion, value: float) -> InferenceResult:
    return InferenceResult("m", mv.version, {"p": np.array([value], np.float32)}, ())


async def until(check: Any) -> None:
    async with asyncio.timeout(30):
        while not check():  # noqa: ASYNC110 - the condition lives in another thread
            await asyncio.sleep(0.01)  # polling it, bounded by the timeout


def test_waiting_copies_are_scored_as_one_batch_per_version() -> None:
    async def scenario() -> None:
        rollout = Rollout()
        gate = threading.Event()
        shadow_runtime = Runtime(gate)
        primary, shadow = version(1, Runtime()), version(2, shadow_runtime)
        route = Route(primary, Reason.PRIMARY, (Copy(shadow, 1.0),))
        rollout.watch("m", 0.5)
        rollout.served(route, True, 0.001, request(0.0), answer(primary, 0.0))
        await until(lambda: shadow_runtime.threads)  # the first copy is in, held at the gate
        for i in range(1, 6):
            rollout.served(route, True, 0.001, request(i / 10), answer(primary, i / 10))
        gate.set()
        await until(lambda: sum(shadow_runtime.calls) == 6)
        report = rollout.reports("m", 1, {2: "shadow"})[1]
        await rollout.close()
        assert shadow_runtime.calls == [1, 5], "the five that waited went as one batch"
        assert report.paired_rows == 6
        assert report.agreement == 1.0
        assert shadow_runtime.threads == {"sluice-copies_0"}

    asyncio.run(scenario())


def test_a_stuck_shadow_holds_up_no_request_of_the_primary() -> None:
    async def scenario() -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-infer")  # the inference pool
        rollout = Rollout()
        gate = threading.Event()
        primary_runtime = Runtime()
        primary, shadow = version(1, primary_runtime), version(2, Runtime(gate))
        dispatcher = DirectDispatcher(primary_runtime.predict, pool, 100)
        route = Route(primary, Reason.PRIMARY, (Copy(shadow, 1.0),))
        rollout.watch("m", 0.5)
        rollout.served(route, True, 0.001, request(0.3), answer(primary, 0.3))
        await until(lambda: shadow.runtime.threads)  # type: ignore[union-attr]
        # The shadow is stuck in its call; the primary's requests are all answered.
        async with asyncio.timeout(30):
            for i in range(20):
                out = await dispatcher.submit({"x": np.array([[i, 0]], np.float32)}, 1)
                assert out["p"][0] == i
        assert primary_runtime.threads == {"sluice-infer_0"}
        gate.set()
        await rollout.close()
        pool.shutdown()

    asyncio.run(scenario())
