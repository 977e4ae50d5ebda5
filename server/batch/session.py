"""Opens what a batch run scores with: the input reader, the core, and the column plan.

The core is the same data plane the HTTP edge uses, holding only the scored
model, with dynamic batching off (``server.batch.core``). Each
chunk still goes through ``DataPlane.infer``: same routing, signature
validation, runtime, statistics and observers as an HTTP request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pyarrow as pa

from server.batch.core import open_offline_plane
from server.batch.errors import BatchUsageError
from server.batch.features import ScoringPlan, input_bindings, plan_scoring
from server.batch.job import BatchJob
from server.batch.readers import ChunkReader, open_reader
from server.batch.report import ChunkObserver, drift_report
from server.core.dataplane import DataPlane
from server.core.repository import ModelRepository, RepositoryError
from server.core.routing import Route


@dataclass(slots=True)
class ScoringSession:
    plane: DataPlane
    route: Route
    plan: ScoringPlan
    reader: ChunkReader
    sha256: str
    named_observers: dict[str, ChunkObserver] = field(default_factory=dict)

    @property
    def observers(self) -> list[ChunkObserver]:
        return list(self.named_observers.values())


def feature_columns(job: BatchJob) -> list[str]:
    """The columns the model reads, from model.yaml, before anything is loaded."""
    repository = ModelRepository(job.settings.model_repository)
    try:
        config = repository.read_config(job.model)
    except RepositoryError as exc:
        raise BatchUsageError(str(exc)) from exc
    return [c for b in input_bindings(job.model, config.signature()) for c in b.columns]


@asynccontextmanager
async def open_scoring(job: BatchJob) -> AsyncIterator[ScoringSession]:
    """Check the file against the model first, then load the core and resolve the version."""
    if not job.settings.model_repository.is_dir():
        raise BatchUsageError(
            f"model repository {job.settings.model_repository} is not a directory"
        )
    repository = ModelRepository(job.settings.model_repository)
    features = feature_columns(job)
    reader = await asyncio.to_thread(
        open_reader, job.input, job.input_format, features, job.chunk_rows
    )
    try:
        signature = repository.read_config(job.model).signature()
        # Fail on missing or mistyped columns before loading any model.
        plan_scoring(job.model, 0, signature, reader.schema, job.keep, str(job.input))
        async with open_offline_plane(job.settings, job.model, job.chunk_rows) as plane:
            route = plane.route(job.model, job.version)
            mv = route.serving
            plan = plan_scoring(
                mv.name, mv.version, mv.signature, reader.schema, job.keep, str(job.input)
            )
            observers: dict[str, ChunkObserver] = {}
            if job.drift_report is not None:
                observers["drift"] = drift_report(job.drift_report, mv, job.settings)
            yield ScoringSession(plane, route, plan, reader, mv.sha256, observers)
    finally:
        reader.close()


async def resolve_plan(job: BatchJob) -> tuple[ScoringPlan, str, pa.Schema]:
    """The checked plan, artifact digest and input schema, for engines scoring elsewhere."""
    async with open_scoring(job) as session:
        return session.plan, session.sha256, session.reader.schema
