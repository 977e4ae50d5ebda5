"""Dispatchers: how validated requests reach a runtime.

``MicroBatcher`` concatenates concurrent requests along the batch dimension;
``DirectDispatcher`` runs each request on its own. Both bound their queue and
raise ``Overloaded`` instead of letting latency grow without limit, and both
run the model in the inference thread pool, never on the event loop, except a
batch of at most ``inline_rows`` rows: one the runtime measured at load to cost
less than the hand-off to a thread (``Executors.inline_rows``). A request
whose deadline passes before compute starts fails with ``DeadlineExceeded``;
time is read and waited on through a ``Clock`` (real monotonic time by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from opentelemetry.trace import SpanContext

from server.core.admission import DelayAdmission
from server.core.monitoring.tracing import BatchTracing
from server.errors import DeadlineExceeded, Overloaded, RuntimeFailure, ServingError

Tensors = dict[str, np.ndarray]
# A request larger than this is computed in pieces of this many rows (or of a batch, if
# larger), queued one after another, so that it never holds the model for seconds while
# others wait (XGBoost at 4,096 rows: milliseconds). A fixed count, not a time: the same
# request is always cut the same way, so its answer does not depend on the load.
SPLIT_ROWS = 4096
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


@dataclass(slots=True)
class _Item:
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]
    enqueued_at: float
    deadline: float | None = field(default=None)
    caller: SpanContext | None = None  # the request's span, when tracing


def _timed(compute: Compute, inputs: Mapping[str, np.ndarray]) -> tuple[Tensors, int]:
    started = time.perf_counter_ns()
    outputs = compute(inputs)
    return outputs, time.perf_counter_ns() - started


def _timed_before(
    compute: Compute,
    inputs: Mapping[str, np.ndarray],
    deadline: float | None,
    now: Callable[[], float],
) -> tuple[Tensors, int]:
    # Checked in the worker thread: the request may have waited in the pool's queue.
    if deadline is not None and now() > deadline:
        raise DeadlineExceeded("request timed out before compute started")
    started = time.perf_counter_ns()
    outputs = compute(inputs)
    return outputs, time.perf_counter_ns() - started


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

    @property
    def depth(self) -> int:
        """Requests accepted and not yet answered."""
        return self._pending

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
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
                outputs, compute_ns = _timed_before(self._compute, inputs, deadline, self._now)
            else:
                outputs, compute_ns = await loop.run_in_executor(
                    self._executor, _timed_before, self._compute, inputs, deadline, self._now
                )
            _check_rows(outputs, rows)
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
        return outputs

    def _observe(self, rows: int, compute_ns: int, ok: bool) -> None:
        if self._observer is not None:
            self._observer(BatchRecord(rows, 1, (0.0,), compute_ns, ok))

    async def close(self) -> None:
        """Nothing is queued here: in-flight requests finish with their callers."""


class MicroBatcher:
    """Forms batches of up to ``max_batch_size`` rows from concurrent requests.

    The wait for more requests happens only while the model is busy with
    another batch, so a lone caller is never delayed by ``max_queue_delay``;
    under load the queue fills during compute and batches form by themselves.

    Admission is on queueing delay (``server.core.admission``): a request
    predicted to wait longer than ``target_queue_delay_s`` (None: adapted
    to the model's batch time; ``math.inf``: off) is refused at once, one
    that did wait longer is refused before compute.
    """

    def __init__(
        self,
        compute: Compute,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_batches_in_flight: int,
        observer: BatchObserver | None = None,
        clock: Clock = MONOTONIC,
        tracing: BatchTracing | None = None,
        inline_rows: int = 0,
        target_queue_delay_s: float | None = None,
    ) -> None:
        self._compute = compute
        self._executor = executor
        self._inline_rows = inline_rows
        self._admission = DelayAdmission(
            target_queue_delay_s, max_batches_in_flight, max_queue_delay_s
        )
        self._queued_rows = 0  # rows of requests accepted and not yet in a batch
        self._tracing = tracing
        self._max_rows = max_batch_size
        self._delay = max_queue_delay_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue_size)
        self._slots = asyncio.Semaphore(max_batches_in_flight)
        self._wake = asyncio.Event()  # a request was queued or a batch finished
        self._observer = observer
        self._clock = clock
        self._now = clock.now
        self._carry: _Item | None = None
        self._in_flight = 0
        self._forming = False  # the loop holds requests it has not dispatched yet
        self._batches: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._settled = asyncio.Event()  # a batch finished while close() waits

    @property
    def depth(self) -> int:
        """Requests waiting to join a batch."""
        return self._queue.qsize() + (1 if self._carry is not None else 0)

    @property
    def admission(self) -> DelayAdmission:
        """The queueing-delay rule, its target and its refusal counts."""
        return self._admission

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, inputs: Tensors, rows: int, deadline: float | None = None) -> Tensors:
        """Queue a validated request and wait for its slice of the batch result."""
        split = max(self._max_rows, SPLIT_ROWS)
        if rows > split:
            return await self._submit_split(inputs, rows, deadline, split)
        return await self._submit(inputs, rows, deadline, admit=True)

    async def _submit_split(
        self, inputs: Tensors, rows: int, deadline: float | None, split: int
    ) -> Tensors:
        # One piece in the queue at a time: other clients' requests join the batches in
        # between. Only the first piece faces admission: a request, once taken, is finished.
        parts = []
        for start in range(0, rows, split):
            end = min(start + split, rows)
            piece = {name: array[start:end] for name, array in inputs.items()}
            parts.append(await self._submit(piece, end - start, deadline, admit=start == 0))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    async def _submit(
        self, inputs: Tensors, rows: int, deadline: float | None, admit: bool
    ) -> Tensors:
        if self._loop_task is None:
            raise RuntimeFailure("batcher is not running")
        if self._idle() and self._tracing is None:
            return await self._alone(inputs, rows, deadline)
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        caller = self._tracing.capture() if self._tracing is not None else None
        item = _Item(inputs, rows, future, self._now(), deadline, caller)
        if self._idle():
            # Nothing queued, forming or running: this request is the whole batch. Run it
            # from the caller's task, without the hops through the batching loop and a new
            # task (one client: p50 +14 % with batching on before this, within noise after).
            await self._slots.acquire()  # free: nothing is in flight
            self._in_flight += 1
            await self._execute([item])
            return await future
        admission = self._admission
        if admit and not admission.admits(self._queued_rows + rows, self._max_rows):
            wait = admission.predicted_wait(self._queued_rows + rows, self._max_rows)
            raise Overloaded(
                f"the queue would hold this request about {wait * 1000:.1f} ms, over the "
                f"model's target of {admission.target_s * 1000:.1f} ms; retry shortly"
            )
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Overloaded(
                f"request queue is full ({self._queue.maxsize} waiting); retry shortly"
            ) from None
        self._queued_rows += rows
        self._wake.set()
        return await future

    async def _alone(self, inputs: Tensors, rows: int, deadline: float | None) -> Tensors:
        """A request that found the batcher idle, computed as a batch of its own.

        What ``_execute`` does for a batch of one, without the item, its future and
        the per-batch bookkeeping of several callers: at one client this path is
        every request (in process, 1-row fraud: batching on cost 7 us a request more
        than off through ``_execute``). Not queued, so nothing to admit; it counts
        as a batch in flight, so requests arriving meanwhile queue behind it.
        """
        await self._slots.acquire()  # free: nothing is in flight
        self._in_flight += 1
        self._admission.unqueued()
        try:
            if deadline is not None and self._now() > deadline:
                raise DeadlineExceeded("request timed out before compute started")
            try:
                if rows <= self._inline_rows:
                    outputs, compute_ns = _timed(self._compute, inputs)
                else:
                    outputs, compute_ns = await asyncio.get_running_loop().run_in_executor(
                        self._executor, _timed, self._compute, inputs
                    )
                _check_rows(outputs, rows)
            except ServingError:
                self._observe(BatchRecord(rows, 1, (0.0,), 0, ok=False))
                raise
            except Exception as exc:
                self._observe(BatchRecord(rows, 1, (0.0,), 0, ok=False))
                raise RuntimeFailure(f"model raised {type(exc).__name__}: {exc}") from exc
            self._admission.computed(compute_ns / 1e9)
            self._observe(BatchRecord(rows, 1, (0.0,), compute_ns, ok=True))
            return outputs
        finally:
            self._finished()

    def _idle(self) -> bool:
        return (
            self._in_flight == 0
            and not self._forming
            and self._carry is None
            and self._queue.empty()
        )

    async def _run(self) -> None:
        while True:
            first = self._carry if self._carry is not None else await self._queue.get()
            self._carry = None
            self._queued_rows -= first.rows
            self._forming = True
            await self._slots.acquire()
            batch = [first]
            rows = self._drain(batch, first.rows)
            rows = await self._wait_for_more(batch, rows, first.enqueued_at + self._delay)
            self._in_flight += 1
            self._forming = False
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _drain(self, batch: list[_Item], rows: int) -> int:
        while rows < self._max_rows and self._carry is None:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if rows + item.rows > self._max_rows:
                self._carry = item  # starts the next batch; never split a request
                break
            batch.append(item)
            self._queued_rows -= item.rows
            rows += item.rows
        return rows

    async def _wait_for_more(self, batch: list[_Item], rows: int, deadline: float) -> int:
        # Waiting only pays off while another batch holds the model.
        while rows < self._max_rows and self._carry is None and self._in_flight > 0:
            if self._now() >= deadline:
                break
            self._wake.clear()
            if not await self._clock.wait(self._wake, deadline):
                break
            rows = self._drain(batch, rows)
        return rows

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            live = self._live(batch)
            if live:
                await self._compute_batch(live)
        finally:
            self._finished()

    def _finished(self) -> None:
        """A batch in flight is done: its slot is free, and the loop and close() may go on."""
        self._in_flight -= 1
        self._slots.release()
        self._wake.set()
        if self._closing:
            self._settled.set()

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now = self._now()
        live = []
        for item in batch:
            if item.future.done():  # caller went away
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("request timed out in the queue before compute started")
                )
                continue
            waited = now - item.enqueued_at
            if self._admission.overdue(waited, now):
                item.future.set_exception(
                    Overloaded(
                        f"request waited {waited * 1000:.1f} ms in the queue, over the model's "
                        f"target of {self._admission.target_s * 1000:.1f} ms; retry shortly"
                    )
                )
                continue
            live.append(item)
        return live

    async def _compute_batch(self, live: list[_Item]) -> None:
        started = self._now()
        queue_s = tuple(started - item.enqueued_at for item in live)
        total = sum(item.rows for item in live)
        if len(live) == 1:
            merged = live[0].inputs
        else:
            names = live[0].inputs.keys()
            merged = {n: np.concatenate([item.inputs[n] for item in live]) for n in names}
        loop = asyncio.get_running_loop()
        span = None
        if self._tracing is not None:
            span = self._tracing.start(total, [item.caller for item in live])
        try:
            if total <= self._inline_rows:
                # Cheaper than the thread hand-off, as measured at load: on the loop.
                outputs, compute_ns = _timed(self._compute, merged)
            else:
                outputs, compute_ns = await loop.run_in_executor(
                    self._executor, _timed, self._compute, merged
                )
            _check_rows(outputs, total)
        except Exception as exc:
            if span is not None:
                BatchTracing.end(span, exc)
            error = (
                exc
                if isinstance(exc, ServingError)
                else RuntimeFailure(f"model raised {type(exc).__name__}: {exc}")
            )
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            self._observe(BatchRecord(total, len(live), queue_s, 0, ok=False))
            return
        if span is not None:
            BatchTracing.end(span)
        self._admission.computed(compute_ns / 1e9)
        offset = 0
        for item in live:
            end = offset + item.rows
            if not item.future.done():
                item.future.set_result({name: out[offset:end] for name, out in outputs.items()})
            offset = end
        self._observe(BatchRecord(total, len(live), queue_s, compute_ns, ok=True))

    def _observe(self, record: BatchRecord) -> None:
        if self._observer is not None:
            self._observer(record)

    async def close(self) -> None:
        """Finish every queued and running batch, then stop the loop."""
        # Every way out of "not idle" ends in _execute, which sets _settled: the loop
        # dispatches whatever it holds or has queued as soon as a slot is free.
        self._closing = True
        try:
            while not self._idle():
                self._settled.clear()
                await self._settled.wait()
        finally:
            self._closing = False
        # Past _execute, each task has at most its done callback left to run.
        await asyncio.gather(*list(self._batches), return_exceptions=True)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None


def _check_rows(outputs: Mapping[str, np.ndarray], rows: int) -> None:
    for name, out in outputs.items():
        if out.ndim == 0 or out.shape[0] != rows:
            raise RuntimeFailure(
                f"model returned {0 if out.ndim == 0 else out.shape[0]} rows for output "
                f"'{name}' but was given {rows}"
            )
