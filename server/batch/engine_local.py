"""The local engine: read, convert, infer and write as a pipeline on one machine.

Three stages overlap, each in order: one thread reads and converts the next
chunks, the service's inference pool scores them, and one thread writes the
scored chunks back and records each completed chunk in the manifest. A chunk
is scored as one request per inference thread (slices of at least
``MIN_SLICE_ROWS`` rows, put back together in order), so every chunk,
the first and the last included, uses the whole pool: a run's first rows are
out after one chunk's time on all threads, and no thread idles while the last
chunk finishes. At most ``depth`` chunks wait between the reader and the
writer, so memory does not grow with the file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.batch.errors import BadRowError, BatchError
from server.batch.features import BadRow, Converted, ScoringPlan, convert, output_batch
from server.batch.job import BatchJob, OnError
from server.batch.manifest import Manifest, input_fingerprint, job_fingerprint
from server.batch.progress import Progress
from server.batch.readers import ChunkReader, InputChunk, Position
from server.batch.report import ChunkObserver
from server.batch.session import ScoringSession, open_scoring
from server.batch.summary import BatchSummary
from server.batch.writers import OutputWriter, QuarantineWriter, WorkPaths, open_writer
from server.core.service import InferenceRequest

log = logging.getLogger("sluice.batch")

# A predict call costs ~0.1 ms whatever its size; 4,096 rows of fraud take ~9 ms on one
# thread, so a slice this large loses about 1 % to it. No slice is ever a lone row
# (ONNX Runtime computes one row with another kernel than a batch).
MIN_SLICE_ROWS = 4096


@dataclass(slots=True)
class Prepared:
    """A chunk read and converted, waiting for the model."""

    chunk: InputChunk
    converted: Converted
    bad: list[BadRow]


@dataclass(slots=True)
class Scored:
    """A chunk with its model outputs, waiting to be written."""

    prepared: Prepared
    outputs: dict[str, np.ndarray]


def slice_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of at most ``parts`` near-equal slices of at least MIN_SLICE_ROWS rows."""
    count = max(1, min(parts, rows // MIN_SLICE_ROWS))
    edges = [rows * i // count for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def _bad_rows(chunk: InputChunk, converted: Converted) -> list[BadRow]:
    rows = chunk.bad + converted.bad
    if chunk.bad and converted.bad:
        rows.sort(key=lambda b: (b.row is None, b.row or 0))
    return rows


class LocalRun:
    """One run of the local engine over an opened session."""

    def __init__(self, job: BatchJob, session: ScoringSession, progress: Progress) -> None:
        self.job = job
        self.session = session
        self.plan: ScoringPlan = session.plan
        self.progress = progress
        self.paths = WorkPaths(job.output)
        self.observers: Sequence[ChunkObserver] = session.observers
        self.manifest, self.resumed = self._manifest()
        # Wall-clock time at which this process's first scored rows were in the output
        # (written and checkpointed): comparable with a clock read outside the process.
        self.first_rows_at: float | None = None
        resume_output = self.manifest.output_state if self.resumed else None
        self.writer: OutputWriter = open_writer(
            self.paths, job.output_format, self.plan.output_schema, resume_output
        )
        quarantine = job.quarantine_path
        self.quarantine = (
            QuarantineWriter(quarantine, self.manifest.quarantine_bytes if self.resumed else None)
            if quarantine is not None
            else None
        )

    def _job_doc(self) -> dict[str, Any]:
        job = self.job
        return {
            "model": self.plan.model,
            "version": self.plan.version,
            "artifact_sha256": self.session.sha256,
            "output": str(job.output.resolve()),
            "input_format": job.input_format.value,
            "output_format": job.output_format.value,
            "keep_columns": list(self.plan.kept),
            "on_error": job.on_error.value,
            "quarantine": str(job.quarantine_path.resolve()) if job.quarantine_path else None,
        }

    def _manifest(self) -> tuple[Manifest, bool]:
        doc = self._job_doc()
        source = input_fingerprint(self.job.input)
        if self.job.resume and self.paths.manifest.exists():
            manifest = Manifest.load(self.paths.manifest)
            manifest.check_resumable(doc, source, self.paths.manifest)
            log.info(
                "resuming after chunk %d (%s rows read)", manifest.chunks, manifest.counts.read
            )
            return manifest, True
        if self.job.resume:
            log.warning("nothing to resume at %s: starting from the beginning", self.job.output)
        elif self.paths.manifest.exists():
            log.warning(
                "discarding the unfinished run of %s (use --resume to continue it)", self.job.output
            )
        self.paths.remove()
        return Manifest(job=doc, fingerprint=job_fingerprint(doc), input=source), False

    # -- pipeline stages --------------------------------------------------------

    def _prepare(self, reader: ChunkReader, first: bool) -> Prepared | None:
        chunk = reader.read()
        if chunk is None:
            return None
        converted = convert(
            self.plan, chunk.batch, chunk.first_row, chunk.row_ids, check_columns=first
        )
        bad = _bad_rows(chunk, converted)
        if bad and self.job.on_error is OnError.FAIL:
            where = f"row {bad[0].row}" if bad[0].row is not None else "a row"
            raise BadRowError(
                f"{self.job.input}: {where}: {bad[0].reason}; stopped by --on-error fail "
                "(use --on-error skip or quarantine to set bad rows aside)"
            )
        return Prepared(chunk, converted, bad)

    async def _score(self, prepared: Prepared) -> Scored:
        converted = prepared.converted
        if not converted.rows:
            return Scored(prepared, {})
        plane, route, plan = self.session.plane, self.session.route, self.plan
        bounds = slice_bounds(converted.rows, self.job.settings.inference_threads)
        results = await asyncio.gather(
            *(
                plane.infer(
                    InferenceRequest(
                        plan.model,
                        {name: t[start:stop] for name, t in converted.inputs.items()},
                        version=plan.version,
                    ),
                    route,
                )
                for start, stop in bounds
            )
        )
        if len(results) == 1:
            return Scored(prepared, results[0].outputs)
        outputs = {
            name: np.concatenate([r.outputs[name] for r in results]) for name in results[0].outputs
        }
        return Scored(prepared, outputs)

    def _commit(self, scored: Scored) -> None:
        prepared = scored.prepared
        if scored.outputs:
            self.writer.write(output_batch(self.plan, prepared.converted.kept, scored.outputs))
        counts = self.manifest.counts
        counts.read += prepared.chunk.rows_read
        counts.scored += prepared.converted.rows
        if self.quarantine is not None:
            self.quarantine.write(prepared.bad)
            counts.quarantined += len(prepared.bad)
        else:
            counts.skipped += len(prepared.bad)
        for bad in prepared.bad:
            counts.reasons[bad.kind.value] = counts.reasons.get(bad.kind.value, 0) + 1
        for observer in self.observers:
            if scored.outputs:
                observer.observe(prepared.converted.inputs, scored.outputs)
        self.manifest.output_state = self.writer.checkpoint()
        if self.quarantine is not None:
            self.manifest.quarantine_bytes = self.quarantine.checkpoint()
        self.manifest.chunks += 1
        self.manifest.position = prepared.chunk.end
        self.manifest.save(self.paths.manifest)
        if self.first_rows_at is None and prepared.converted.rows:
            self.first_rows_at = time.time()

    # -- orchestration ----------------------------------------------------------

    async def run(self) -> BatchSummary:
        started = time.monotonic() - self.manifest.elapsed_s
        reader = self.session.reader
        reader.start(self.plan.read_columns, self.manifest.position)
        depth = max(2, self.job.settings.inference_threads + 1)
        read_pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-batch-read")
        write_pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-batch-write")
        queue: asyncio.Queue[asyncio.Task[Scored] | None] = asyncio.Queue(maxsize=depth)
        loop = asyncio.get_running_loop()

        async def produce() -> None:
            first = self.manifest.position == Position()
            while True:
                prepared = await loop.run_in_executor(read_pool, self._prepare, reader, first)
                if prepared is None:
                    break
                first = False
                await queue.put(asyncio.create_task(self._score(prepared)))
            await queue.put(None)

        async def consume() -> None:
            while (task := await queue.get()) is not None:
                scored = await task
                await loop.run_in_executor(write_pool, self._commit, scored)
                self.manifest.elapsed_s = time.monotonic() - started
                self.progress.update(self.manifest.counts.read, scored.prepared.chunk.progress)

        finished = False
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce())
                group.create_task(consume())
            await loop.run_in_executor(write_pool, self._finish)
            finished = True
        except BaseException as exc:
            await self._abandon(queue)
            if isinstance(exc, BaseExceptionGroup):
                raise exc.exceptions[0] from None
            raise
        finally:
            # A commit still running in the write thread completes first, so the
            # manifest always matches the files it describes.
            read_pool.shutdown(wait=True)
            write_pool.shutdown(wait=True)
            reader.close()
            if not finished:
                self.writer.close()
                if self.quarantine is not None:
                    self.quarantine.close()
        return self._summary(time.monotonic() - started)

    def _finish(self) -> None:
        self.writer.commit()
        if self.quarantine is not None:
            self.quarantine.commit()
        self.paths.manifest.unlink(missing_ok=True)

    async def _abandon(self, queue: asyncio.Queue[asyncio.Task[Scored] | None]) -> None:
        """Stop: chunks not yet committed are dropped; the manifest still says what is safe."""
        tasks = []
        while not queue.empty():
            task = queue.get_nowait()
            if task is not None:
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    def discard(self) -> None:
        """Forget the partial output (a run stopped by a bad row cannot be resumed usefully)."""
        self.paths.remove()
        if self.quarantine is not None:
            self.quarantine.discard()

    def _summary(self, seconds: float) -> BatchSummary:
        job = self.job
        return BatchSummary(
            model=self.plan.model,
            version=self.plan.version,
            engine=job.engine.value,
            input=str(job.input),
            output=str(job.output),
            input_format=job.input_format.value,
            output_format=job.output_format.value,
            on_error=job.on_error.value,
            counts=self.manifest.counts,
            seconds=seconds,
            chunks=self.manifest.chunks,
            resumed=self.resumed,
            quarantine=str(self.quarantine.path) if self.quarantine else None,
            reports={},
            first_rows_at=self.first_rows_at,
        )


async def run_local(job: BatchJob, progress: Progress) -> BatchSummary:
    """Score ``job.input`` into ``job.output`` on this machine."""
    async with open_scoring(job) as session:
        run = LocalRun(job, session, progress)
        try:
            summary = await run.run()
        except BaseException as exc:
            # Keep a resumable state only when it holds completed work worth resuming.
            if isinstance(exc, BatchError) or not (run.manifest.chunks or run.resumed):
                run.discard()
            raise
        summary.reports = {name: o.finish() for name, o in session.named_observers.items()}
        return summary
