"""``MicroBatcher``: concurrent requests concatenated along the batch dimension.

The dispatcher contract it keeps, and ``DirectDispatcher`` for models that do
not batch, are ``server.core.dispatch``; a batch of at most ``inline_rows``
rows runs on the event loop, any other in the inference thread pool.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext

from server.core.admission import DelayAdmission
from server.core.dispatch import (
    MONOTONIC,
    BatchObserver,
    BatchRecord,
    Clock,
    Compute,
    Landing,
    Tensors,
    check_rows,
    timed,
)
from server.core.monitoring.tracing import BatchTracing
from server.errors import DeadlineExceeded, Overloaded, RuntimeFailure, ServingError

# A request larger than this is computed in pieces of this many rows (or of a batch, if
# larger), queued one after another, so that it never holds the model for seconds while
# others wait (XGBoost at 4,096 rows: milliseconds). A fixed count, not a time: the same
# request is always cut the same way, so its answer does not depend on the load.
SPLIT_ROWS = 4096


@dataclass(slots=True)
class _Item:
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]
    enqueued_at: float
    deadline: float | None = field(default=None)
    caller: SpanContext | None = None  # the request's span, when tracing
    tag: bytes | None = None  # handed to the landing with the row's outputs


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
        self._landing: Landing | None = None

    @property
    def depth(self) -> int:
        """Requests waiting to join a batch."""
        return self._queue.qsize() + (1 if self._carry is not None else 0)

    @property
    def admission(self) -> DelayAdmission:
        """The queueing-delay rule, its target and its refusal counts."""
        return self._admission

    def land_in(self, landing: Landing) -> None:
        """Hand each batch's tagged one-row requests to ``landing`` as their results are set."""
        self._landing = landing

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def submit(
        self, inputs: Tensors, rows: int, deadline: float | None = None, tag: bytes | None = None
    ) -> Tensors:
        """Queue a validated request and wait for its slice of the batch result.

        A ``tag`` (one-row requests only) goes to the landing with the row's outputs.
        """
        split = max(self._max_rows, SPLIT_ROWS)
        if rows > split:
            return await self._submit_split(inputs, rows, deadline, split)
        return await self._submit(inputs, rows, deadline, True, tag)

    async def _submit_split(
        self, inputs: Tensors, rows: int, deadline: float | None, split: int
    ) -> Tensors:
        # One piece in the queue at a time: other clients' requests join the batches in
        # between. Only the first piece faces admission: a request, once taken, is finished.
        parts = []
        for start in range(0, rows, split):
            end = min(start + split, rows)
            piece = {name: array[start:end] for name, array in inputs.items()}
            parts.append(await self._submit(piece, end - start, deadline, start == 0, None))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    async def _submit(
        self, inputs: Tensors, rows: int, deadline: float | None, admit: bool, tag: bytes | None
    ) -> Tensors:
        if self._loop_task is None:
            raise RuntimeFailure("batcher is not running")
        if self._idle():
            return await self._alone(inputs, rows, deadline, tag)
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        caller = self._tracing.capture() if self._tracing is not None else None
        item = _Item(inputs, rows, future, self._now(), deadline, caller, tag)
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

    async def _alone(
        self, inputs: Tensors, rows: int, deadline: float | None, tag: bytes | None
    ) -> Tensors:
        """A request that found the batcher idle (nothing queued, forming or running),
        computed as a batch of its own from the caller's task.

        No hop through the batching loop, no item or future, none of the bookkeeping of
        several callers: at one client this is every request (in process, 1-row fraud:
        through the loop's path batching on cost 7 us a request more than off, through
        this one nothing). Not queued, so nothing to admit; it counts as a batch in
        flight, so requests arriving meanwhile queue behind it.
        """
        await self._slots.acquire()  # free: nothing is in flight
        self._in_flight += 1
        self._admission.unqueued()
        if rows <= self._inline_rows:
            # To be computed on the loop, which nothing else can use meanwhile: first let
            # the requests read in this same loop iteration reach submit, so they queue
            # behind this one as one batch instead of each computing alone (64 clients:
            # 10.4-10.8k req/s without this yield, about 16k with it, as with none inline).
            await asyncio.sleep(0)
        span = None
        error: BaseException | None = None
        try:
            if deadline is not None and self._now() > deadline:
                raise DeadlineExceeded("request timed out before compute started")
            if self._tracing is not None:
                span = self._tracing.start(rows, (self._tracing.capture(),))
            try:
                outputs, compute_ns = await self._computed(inputs, rows)
            except Exception as exc:
                error = exc
                self._observe(BatchRecord(rows, 1, (0.0,), 0, ok=False))
                if isinstance(exc, ServingError):
                    raise
                raise RuntimeFailure(f"model raised {type(exc).__name__}: {exc}") from exc
            self._admission.computed(compute_ns / 1e9)
            self._observe(BatchRecord(rows, 1, (0.0,), compute_ns, ok=True))
            if tag is not None and self._landing is not None:
                self._landing([(tag, 0)], outputs)
            return outputs
        finally:
            if span is not None:
                BatchTracing.end(span, error)
            self._finished()

    async def _computed(self, inputs: Tensors, rows: int) -> tuple[Tensors, int]:
        """The model's outputs for ``rows`` rows and the nanoseconds it took."""
        if rows <= self._inline_rows:
            # Cheaper than the thread hand-off, as measured at load: on the loop.
            outputs, compute_ns = timed(self._compute, inputs)
        else:
            outputs, compute_ns = await asyncio.get_running_loop().run_in_executor(
                self._executor, timed, self._compute, inputs
            )
        check_rows(outputs, rows)
        return outputs, compute_ns

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
        span = None
        if self._tracing is not None:
            span = self._tracing.start(total, [item.caller for item in live])
        try:
            outputs, compute_ns = await self._computed(merged, total)
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
        tagged: list[tuple[bytes, int]] = []
        for item in live:
            end = offset + item.rows
            if not item.future.done():
                item.future.set_result({name: out[offset:end] for name, out in outputs.items()})
                if item.tag is not None:
                    tagged.append((item.tag, offset))
            offset = end
        if tagged and self._landing is not None:
            self._landing(tagged, outputs)
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
