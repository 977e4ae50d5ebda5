"""How validated requests reach a runtime: the dispatcher contract, and ``DirectDispatcher``.

A dispatcher (``Dispatcher``) takes a validated request and answers its
outputs: ``DirectDispatcher`` runs each request on its own, the
``MicroBatcher`` (``server.core.batcher``) concatenates concurrent ones, and
the result cache wraps either with the same contract. Each bounds what it
holds and raises ``Overloaded`` instead of letting latency grow without
limit, and runs the model in the inference thread pool, never on the event
loop, except a batch of at most ``inline_rows`` rows: one the runtime
measured at load to cost less than the hand-off to a thread
(``Executors.inline_rows``). A request whose deadline passes before compute
starts fails with ``DeadlineExceeded``; time is read and waited on through a
``Clock`` (real monotonic time by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from server.core.monitoring.tracing import BatchTracing
from server.errors import DeadlineExceeded, Overloaded, RuntimeFailure, ServingError

Tensors = dict[str, np.ndarray]
Compute = Callable[[Mapping[str, np.ndarray]], Tensors]


class Clock(Protocol):
    """The time a dispatcher reads and waits on; deadlines are on this clock."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def wait(self, event: asyncio.Event, deadline: float) -> bool:
        """Wait until ``event`` is set (True) or this clock reaches ``deadline`` (False)."""
        ...


class MonotonicClock:
    """Real time: ``time.monotonic()``, which is also what the event loop's timers use."""

    __slots__ = ()

    # The builtin itself, not a method wrapping it: read once per request on the hot path.
    now = staticmethod(time.monotonic)

    async def wait(self, event: asyncio.Event, deadline: float) -> bool:
        """Wait until ``event`` is set (True) or ``time.monotonic()`` reaches ``deadline``."""
        try:
            await asyncio.wait_for(event.wait(), deadline - time.monotonic())
        except TimeoutError:
            return False
        return True


MONOTONIC = MonotonicClock()


@dataclass(slots=True, frozen=True)
class BatchRecord:
    """What one model execution did; handed to the stats observer."""

    rows: int
    requests: int
    queue_s: tuple[float, ...]
    compute_ns: int
    ok: bool


BatchObserver = Callable[[BatchRecord], None]


class Dispatcher(Protocol):
    """How a validated request reaches a runtime: the batcher, the direct runner, or a
    wrapper around one of them (the result cache) with the same contract."""

    @property
    def depth(self) -> int: ...

    async def submit(
        self, inputs: Tensors, rows: int, deadline: float | None = None
    ) -> Tensors: ...

    async def close(self) -> None: ...


Landing = Callable[[list[tuple[bytes, int]], Tensors], None]
"""Takes a computed batch's tagged requests, as (tag, offset of the request's row), and
the batch's outputs."""


@runtime_checkable
class Tagging(Dispatcher, Protocol):
    """A dispatcher that hands the rows of tagged one-row requests to a ``Landing`` where
    it sets their results, one call per batch: how the result cache stores its misses,
    in one loop over the batch instead of once in each caller (``server.core.cache``)."""

    def land_in(self, landing: Landing) -> None: ...

    async def submit(
        self, inputs: Tensors, rows: int, deadline: float | None = None, tag: bytes | None = None
    ) -> Tensors: ...


def timed(compute: Compute, inputs: Mapping[str, np.ndarray]) -> tuple[Tensors, int]:
    started = time.perf_counter_ns()
    outputs = compute(inputs)
    return outputs, time.perf_counter_ns() - started


def timed_before(
    compute: Compute,
    inputs: Mapping[str, np.ndarray],
    deadline: float | None,
    now: Callable[[], float],
) -> tuple[Tensors, int]:
    # Checked in the worker thread: the request may have waited in the pool's queue.
    if deadline is not None and now() > deadline:
        raise DeadlineExceeded("request timed out before compute started")
    return timed(compute, inputs)


class DirectDispatcher:
    """One model execution per request, with a bound on requests in flight."""

    def __init__(
        self,
        compute: Compute,
        executor: Executor,
        max_pending: int,
        observer: BatchObserver | None = None,
        clock: Clock = MONOTONIC,
        tracing: BatchTracing | None = None,
        inline_rows: int = 0,
    ) -> None:
        self._compute = compute
        self._executor = executor
        self._inline_rows = inline_rows
        self._max_pending = max_pending
        self._pending = 0
        self._observer = observer
        self._now = clock.now
        self._tracing = tracing
        self._landing: Landing | None = None

    @property
    def depth(self) -> int:
        """Requests accepted and not yet answered."""
        return self._pending

    def land_in(self, landing: Landing) -> None:
        """Hand each tagged request's outputs to ``landing`` once computed."""
        self._landing = landing

    async def submit(
        self, inputs: Tensors, rows: int, deadline: float | None = None, tag: bytes | None = None
    ) -> Tensors:
        """Run the model on this request alone, unless its deadline passes first."""
        if self._pending >= self._max_pending:
            raise Overloaded(f"too many requests in flight ({self._max_pending}); retry shortly")
        self._pending += 1
        loop = asyncio.get_running_loop()
        span = self._tracing.start(rows, (self._tracing.capture(),)) if self._tracing else None
        error: BaseException | None = None
        try:
            if rows <= self._inline_rows:
                # Measured at load to cost less than the hand-off to a thread (see
                # Executors.inline_rows): run on the loop, which it stalls for as long.
                outputs, compute_ns = timed_before(self._compute, inputs, deadline, self._now)
            else:
                outputs, compute_ns = await loop.run_in_executor(
                    self._executor, timed_before, self._compute, inputs, deadline, self._now
                )
            check_rows(outputs, rows)
        except DeadlineExceeded as exc:
            error = exc  # the model never ran: no execution to record
            raise
        except ServingError as exc:
            error = exc
            self._observe(rows, 0, ok=False)
            raise
        except Exception as exc:
            error = exc
            self._observe(rows, 0, ok=False)
            raise RuntimeFailure(f"model raised {type(exc).__name__}: {exc}") from exc
        finally:
            self._pending -= 1
            if span is not None:
                BatchTracing.end(span, error)
        self._observe(rows, compute_ns, ok=True)
        if tag is not None and self._landing is not None:
            self._landing([(tag, 0)], outputs)
        return outputs

    def _observe(self, rows: int, compute_ns: int, ok: bool) -> None:
        if self._observer is not None:
            self._observer(BatchRecord(rows, 1, (0.0,), compute_ns, ok))

    async def close(self) -> None:
        """Nothing is queued here: in-flight requests finish with their callers."""


def check_rows(outputs: Mapping[str, np.ndarray], rows: int) -> None:
    for name, out in outputs.items():
        if out.ndim == 0 or out.shape[0] != rows:
            raise RuntimeFailure(
                f"model returned {0 if out.ndim == 0 else out.shape[0]} rows for output "
                f"'{name}' but was given {rows}"
            )
