"""The Ray engine: the same scoring inside Ray Data actors, for files too big for one machine.

The driver checks the file against the model and pins the version exactly as
the local engine does. Each actor opens the same core (``open_offline_plane``) once
and scores every batch it is given through ``DataPlane.infer``, so a
row gets the same output on either engine. Output is a directory of part
files, moved into place when the whole dataset is written. Ray is an optional
extra: ``pip install 'sluice[ray]'``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from server.batch.core import open_offline_plane
from server.batch.errors import BadRowError, BatchError, BatchUsageError
from server.batch.features import BadRow, ScoringPlan, convert, output_batch, plan_scoring
from server.batch.job import BatchJob, Format, OnError
from server.batch.manifest import Counts
from server.batch.progress import Progress
from server.batch.readers import jsonl_options, parse_jsonl
from server.batch.session import resolve_plan
from server.batch.summary import BatchSummary
from server.core.dataplane import DataPlane
from server.core.service import InferenceRequest

log = logging.getLogger("sluice.batch")
TEXT_COLUMN = "text"


class RayScorer:
    """A Ray Data actor: loads the model once, then scores batches through the core.

    ``close()`` releases the core (models, inference thread) and the event loop.
    Under Ray nothing can call it: Ray Data gives a callable class no end-of-run
    hook. When a run ends, successfully or not, its executor releases the actor
    pool (``ActorPoolMapOperator.shutdown``) and each actor exits; on the way out
    ``_MapWorker.__ray_shutdown__`` only drops its reference to this instance,
    which reaches the instance through ``__del__`` alone, and not at all when the
    actor is killed (``ray.kill``, ``ray.shutdown()``) or crashes. A finalizer
    that runs an event loop is no teardown, so there is none: the actor
    process's exit releases the thread, the runtimes and the loop, and the engine
    makes sure the actors end (``run_ray``). ``close()`` is for a scorer used in
    process; it is idempotent.
    """

    def __init__(self, job: BatchJob, version: int, sha256: str, schema: pa.Schema) -> None:
        self._job = job
        self._loop = asyncio.new_event_loop()
        self._stack = AsyncExitStack()
        settings = job.settings.model_copy(update={"inference_threads": 1})
        self._plane: DataPlane = self._loop.run_until_complete(
            self._stack.enter_async_context(open_offline_plane(settings, job.model, job.chunk_rows))
        )
        self._route = self._plane.route(job.model, version)
        mv = self._route.serving
        if mv.sha256 != sha256:
            raise BatchUsageError(
                f"model '{job.model}' version {version} on this worker differs from the driver's "
                f"(sha256 {mv.sha256[:12]} != {sha256[:12]}): is the repository shared?"
            )
        self._plan: ScoringPlan = plan_scoring(
            mv.name, mv.version, mv.signature, schema, job.keep, str(job.input)
        )
        self._json = (
            jsonl_options(schema, self._plan.feature_columns, self._plan.read_columns)
            if job.input_format is Format.JSONL
            else None
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        plan = self._plan
        bad: list[BadRow] = []
        if self._json is not None:
            lines = [s.encode() for s in table.column(TEXT_COLUMN).to_pylist()]
            batch, _, bad = parse_jsonl(lines, 0, plan.feature_columns, self._json)
        else:
            table = table.combine_chunks()
            batch = table.to_batches()[0] if table.num_rows else None
            if batch is None:
                return plan.output_schema.empty_table()
        converted = convert(plan, batch, 0)
        bad += converted.bad
        for row in bad:
            row.row = None  # Ray batches carry no position in the file
        if bad:
            self._set_aside(bad)
        if not converted.rows:
            return plan.output_schema.empty_table()
        result = self._loop.run_until_complete(
            self._plane.infer(
                InferenceRequest(plan.model, converted.inputs, version=plan.version), self._route
            )
        )
        return pa.Table.from_batches([output_batch(plan, converted.kept, result.outputs)])

    def _set_aside(self, bad: list[BadRow]) -> None:
        job = self._job
        if job.on_error is OnError.FAIL:
            raise BadRowError(
                f"{job.input}: {bad[0].reason}; stopped by --on-error fail "
                "(use --on-error skip or quarantine to set bad rows aside)"
            )
        quarantine = job.quarantine_path
        if quarantine is None:
            return
        parts = _quarantine_parts(quarantine)
        parts.mkdir(parents=True, exist_ok=True)
        lines = b"".join(
            orjson.dumps(
                {"_row": None, "_error": b.reason, **b.record},
                default=str,
                option=orjson.OPT_APPEND_NEWLINE,
            )
            for b in bad
        )
        (parts / f"part-{uuid.uuid4().hex}.jsonl").write_bytes(lines)

    def close(self) -> None:
        """Close the core (drain, unload, stop its thread pool), then the event loop."""
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._stack.aclose())
        finally:
            self._loop.close()


def _quarantine_parts(path: Path) -> Path:
    return path.with_name(path.name + ".sluice-parts")


def _read(job: BatchJob, columns: list[str]) -> Any:
    import ray.data

    source = str(job.input)
    if job.input_format is Format.PARQUET:
        return ray.data.read_parquet(source, file_extensions=None).select_columns(columns)
    if job.input_format is Format.CSV:
        return ray.data.read_csv(
            source,
            file_extensions=None,
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                include_columns=columns,
                strings_can_be_null=False,
            ),
        )
    return ray.data.read_text(source, file_extensions=None)


def _write(dataset: Any, fmt: Format, directory: Path) -> None:
    if fmt is Format.PARQUET:
        dataset.write_parquet(str(directory))
    elif fmt is Format.CSV:
        dataset.write_csv(str(directory))
    else:
        dataset.write_json(str(directory))


def _rows_written(directory: Path, fmt: Format) -> int:
    total = 0
    for part in sorted(p for p in directory.rglob("*") if p.is_file()):
        if fmt is Format.PARQUET:
            total += pq.ParquetFile(part).metadata.num_rows
        elif fmt is Format.CSV:
            total += pacsv.read_csv(part).num_rows
        else:
            with part.open("rb") as handle:
                total += sum(1 for line in handle if line.strip())
    return total


def _move_into_place(temp: Path, output: Path) -> None:
    if output.is_dir():
        old = output.with_name(output.name + ".sluice-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(temp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if output.exists():
            output.unlink()
        os.replace(temp, output)


def _gather_quarantine(path: Path) -> int:
    """Concatenate the actors' quarantine parts into one JSON Lines file."""
    parts = _quarantine_parts(path)
    temp = path.with_name(path.name + ".sluice-tmp")
    count = 0
    with temp.open("wb") as out:
        for part in sorted(parts.glob("part-*.jsonl")) if parts.is_dir() else []:
            data = part.read_bytes()
            count += data.count(b"\n")
            out.write(data)
    os.replace(temp, path)
    shutil.rmtree(parts, ignore_errors=True)
    return count


_WORKER_ERRORS: dict[str, type[BatchError]] = {
    "BadRowError": BadRowError,
    "BatchUsageError": BatchUsageError,
    "BatchError": BatchError,
}
_WORKER_ERROR = re.compile(r"server\.batch\.errors\.(\w+): (.+)")


def _user_error(exc: BaseException) -> BatchError | None:
    """The BatchError a worker raised, rebuilt from Ray's wrapper (it carries only the text)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, BatchError):
            return current
        current = current.__cause__
    found = _WORKER_ERROR.search(str(exc))
    if found is None or found.group(1) not in _WORKER_ERRORS:
        return None
    return _WORKER_ERRORS[found.group(1)](found.group(2))


def run_ray(job: BatchJob, progress: Progress) -> BatchSummary:
    """Score ``job.input`` on a Ray cluster (a local one when no address is given)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchUsageError("--engine ray needs Ray Data: pip install 'sluice[ray]'") from None
    plan, sha256, schema = asyncio.run(resolve_plan(job))
    started_ray = False
    if not ray.is_initialized():
        ray.init(address=job.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        started_ray = True
    started = time.monotonic()
    temp = job.output.with_name(job.output.name + ".sluice-tmp")
    shutil.rmtree(temp, ignore_errors=True)
    quarantine = job.quarantine_path
    if quarantine is not None:
        shutil.rmtree(_quarantine_parts(quarantine), ignore_errors=True)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        cpus = ray.cluster_resources().get("CPU", 2)  # type: ignore[no-untyped-call]
        actors = job.ray_actors or max(1, int(cpus) - 1)
        source = _read(job, plan.read_columns)
        read = source.count()
        scored = source.map_batches(
            RayScorer,
            fn_constructor_kwargs={
                "job": job,
                "version": plan.version,
                "sha256": sha256,
                "schema": schema,
            },
            batch_size=job.chunk_rows,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=1,
        )
        # The actors end with the run: when the write returns or raises, Ray Data has
        # released the actor pool, and a Ray started here is shut down below.
        _write(scored, job.output_format, temp)
    except Exception as exc:
        shutil.rmtree(temp, ignore_errors=True)
        error = _user_error(exc)
        if error is not None:
            raise error from None
        raise BatchError(f"Ray job failed: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        if started_ray:
            ray.shutdown()
    counts = Counts(read=read, scored=_rows_written(temp, job.output_format))
    _move_into_place(temp, job.output)
    if quarantine is not None:
        counts.quarantined = _gather_quarantine(quarantine)
    counts.skipped = counts.read - counts.scored - counts.quarantined
    if counts.skipped < 0 or (job.on_error is not OnError.SKIP and counts.skipped):
        log.warning("row counts do not add up: %s", counts)
    progress.update(counts.read, 1.0)
    return BatchSummary(
        model=plan.model,
        version=plan.version,
        engine=job.engine.value,
        input=str(job.input),
        output=str(job.output),
        input_format=job.input_format.value,
        output_format=job.output_format.value,
        on_error=job.on_error.value,
        counts=counts,
        seconds=time.monotonic() - started,
        quarantine=str(quarantine) if quarantine else None,
    )
