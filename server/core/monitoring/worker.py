"""The background task behind drift, data quality and feedback, fed by per-version buffers.

The serving path only calls ``observe``: it appends the request's monitored
tensors and its id to its version's ``VersionBuffer`` (a few list appends,
nothing the garbage collector tracks per request), or drops and counts the
request when ``queue_size`` requests are already waiting. The worker wakes
every ``PACE_S`` while there is traffic (sooner when half of ``queue_size`` is
waiting), takes each buffer whole and does the numpy work per version per
block: for the 30-feature fraud model under a millisecond per block plus about
half a microsecond per row, a large block in parts with the loop free between
them (``PART_ROWS``). Its failures are logged, never raised into a
request. ``flush`` waits until everything observed
before it is counted, so a report or a feedback call sees the requests its
caller already got answers to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import Observation

from server.config import DriftSettings, FeedbackSettings
from server.core.monitoring.buffer import Block, VersionBuffer
from server.core.monitoring.drift import Column, DriftMonitor, Extractor, Status, worst
from server.core.monitoring.feedback import (
    FeedbackOutcome,
    Label,
    PredictionStore,
    StoredPrediction,
    VersionKey,
    rows_match,
)
from server.core.monitoring.metrics import Attributes, report_observations
from server.core.monitoring.quality import QualityTracker, card_metrics
from server.core.monitoring.reference import NumericProfile, ProfileError, load_reference
from server.core.monitoring.shared import SharedPredictions
from server.core.registry import ModelVersion
from server.core.service import InferenceRequest, InferenceResult
from server.core.signature import FLOAT_TYPES
from server.core.store import SharedStore
from server.errors import Overloaded

log = logging.getLogger("sluice.monitoring")

# Let observations accumulate so numpy works on blocks, not single rows. Under load
# 0.05 s cost ~5 us more per request (the per-block part) and 1 s saved nothing.
PACE_S = 0.25
FLUSH_TIMEOUT_S = 10.0
# A block is counted in parts of about PART_ROWS rows (1 to 3.5 ms of numpy each), with
# PART_GAP_S between them for the loop: a quarter second of 16-row fraud requests at 7,000
# a second is 28,000 rows, about 15 ms on the event loop in one go, which every request
# arriving meanwhile waited out. At twice the capacity, accepted p99: 21 ms in one go,
# 17.9 ms in parts back to back (a request's every hop waited for a part), 12.8 ms with
# the gap, 12.1 ms with drift and feedback off (medians of 2 alternated rounds).
# 4096 left a quarter second of 1-row requests at 8,000 a second (2,000 rows) in one
# part: 1.6-2.5 ms on the loop four times a second, and every burst of 3-8 ms latencies
# in an open-loop time series began at one. 512 rows is about half a millisecond.
PART_ROWS = 512
PART_GAP_S = 0.002


@dataclass(slots=True)
class MonitoredVersion:
    """Everything monitored for one served version."""

    key: VersionKey
    sha256: str
    attributes: Attributes
    drift: DriftMonitor | None
    drift_reason: str
    quality: QualityTracker | None
    score: Extractor | None
    matched: int = 0
    dirty: bool = True
    observations: dict[str, list[Observation]] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[frozenset[str], frozenset[str]]:
        """The input and output tensors its monitors read."""
        inputs: frozenset[str] = frozenset()
        outputs: frozenset[str] = frozenset()
        if self.drift is not None:
            inputs, outputs = self.drift.input_names, self.drift.output_names
        if self.score is not None:
            outputs |= self.score.tensors
        return inputs, outputs


class MonitoringWorker:
    """Drift windows, the prediction store and quality trackers of every served version."""

    def __init__(
        self,
        drift: DriftSettings,
        feedback: FeedbackSettings,
        attributes: Callable[[str, int], Attributes],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.drift_settings = drift
        self.feedback_settings = feedback
        self._attributes = attributes
        self._clock = clock
        self._capacity = drift.queue_size
        self._half = max(2, drift.queue_size // 2)
        self._buffers: dict[VersionKey, VersionBuffer] = {}
        self._retired: list[VersionBuffer] = []  # of versions reloaded since, not yet taken
        self._last: VersionBuffer | None = None
        self._waiting = 0
        self._ready = asyncio.Event()  # something to do: observations, a flush, a publish
        self._flushes: list[asyncio.Future[None]] = []
        self._states: dict[VersionKey, MonitoredVersion] = {}
        self._store = (
            PredictionStore(feedback.max_predictions, feedback.retention_s)
            if feedback.enabled
            else None
        )
        self._unmatched: dict[str, int] = {}
        self._shared: SharedPredictions | None = None
        self._versions: Callable[[VersionKey], ModelVersion | None] = lambda key: None
        self._published: dict[str, list[Observation]] = {}
        self._published_at = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._hurry = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    # -- the serving path ----------------------------------------------------------

    def observe(
        self, version: ModelVersion, request: InferenceRequest, result: InferenceResult
    ) -> None:
        if self._waiting >= self._capacity:
            self.dropped += 1
            return
        buffer = self._last
        if buffer is None or buffer.version is not version:  # another version than last time
            buffer = self._buffers.get((version.name, version.version))
            if buffer is None or buffer.version is not version:
                buffer = self._buffer(version)
            self._last = buffer
        if not buffer.ids:  # the first since the worker last took this buffer
            self._ready.set()
        buffer.add(request.inputs, result.outputs, result.id)
        self._waiting += 1
        if self._waiting == self._half:  # do not wait out the pace into dropping
            self._hurry.set()

    def _buffer(self, version: ModelVersion) -> VersionBuffer:
        key = (version.name, version.version)
        previous = self._buffers.get(key)
        if previous is not None and previous.ids:
            self._retired.append(previous)
        buffer = self._buffers[key] = VersionBuffer(version)
        state = self._states.get(key)
        if state is not None and state.sha256 == version.sha256:
            buffer.narrow(*state.tensors)
        return buffer

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Count what is queued, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(Overloaded):
            await self.flush()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        """Return once everything observed before this call has been counted."""
        if self._task is None or self._task.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append(done)
        self._ready.set()
        self._hurry.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), FLUSH_TIMEOUT_S)
        except TimeoutError:
            raise Overloaded("monitoring is behind; retry shortly") from None

    # -- the worker ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            flushes, self._flushes = self._flushes, []
            retired, self._retired = self._retired, []
            for buffer in [*retired, *self._buffers.values()]:
                if not buffer.ids:
                    continue
                state = None
                try:
                    state = await self._state(buffer.version)
                except Exception:  # monitoring must never take serving down
                    log.exception("monitoring failed for %s", buffer.version.name)
                # Taken after the await: what arrived meanwhile is counted now too.
                block = buffer.take()
                self._waiting -= len(block)
                if state is None:
                    continue
                for part in block.parts(PART_ROWS):
                    try:
                        self._absorb(state, part)
                    except Exception:
                        log.exception("monitoring failed for %s", buffer.version.name)
                        break
                    if part is not block:
                        await asyncio.sleep(PART_GAP_S)
            try:
                self._publish_if_due()
            except Exception:
                log.exception("publishing monitoring results failed")
            for done in flushes:
                if not done.done():
                    done.set_result(None)
            await self._pace()

    async def _pace(self) -> None:
        """Let observations accumulate, unless someone waits for a flush."""
        self._hurry.clear()
        if self._flushes or self._waiting >= self._half:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), PACE_S)

    async def _state(self, mv: ModelVersion) -> MonitoredVersion:
        key = (mv.name, mv.version)
        state = self._states.get(key)
        if state is None or state.sha256 != mv.sha256:
            state = await asyncio.to_thread(self._build, mv)
            self._states[key] = state
            buffer = self._buffers.get(key)
            if buffer is not None and buffer.version is mv:
                buffer.narrow(*state.tensors)
        return state

    def _build(self, mv: ModelVersion) -> MonitoredVersion:
        drift: DriftMonitor | None = None
        reason = ""
        reference = None
        if not self.drift_settings.enabled:
            reason = "drift monitoring is disabled"
        elif mv.source is None or not mv.source.reference_path.is_file():
            reason = "this version has no reference.json"
        elif not mv.signature.batched:
            reason = "drift needs a batch dimension on every input"
        else:
            try:
                reference = load_reference(mv.source.reference_path)
                drift = DriftMonitor(reference, mv.signature, self.drift_settings)
            except ProfileError as exc:
                reason = str(exc)
                log.warning("%s v%d: no drift monitoring: %s", mv.name, mv.version, exc)
        quality = None
        if self.feedback_settings.enabled:
            card = card_metrics(mv.source.card) if mv.source is not None else {}
            quality = QualityTracker(card, self.feedback_settings)
        return MonitoredVersion(
            key=(mv.name, mv.version),
            sha256=mv.sha256,
            attributes=self._attributes(mv.name, mv.version),
            drift=drift,
            drift_reason=reason,
            quality=quality,
            score=_score_column(mv, reference.predictions if reference else {}),
        )

    def _absorb(self, state: MonitoredVersion, block: Block) -> None:
        now = self._clock()
        if state.drift is not None:
            _, outputs = block.complete(state.drift.output_names)
            state.drift.update(block.joined_inputs(state.drift.input_names), outputs, now)
            state.dirty = True
        if self._store is not None and state.score is not None:
            tensor = state.score.columns[0].tensor
            if tensor not in block.outputs:
                return
            keep, joined = block.complete((tensor,))
            scores = state.score.matrix(joined) if joined else None
            if scores is not None:
                ids = block.ids if keep is None else [block.ids[i] for i in keep]
                sizes = block.sizes(tensor)
                self._store.put(state.key, ids, sizes, scores[:, 0], now)
                if self._shared is not None:
                    self._shared.put(state.key, ids, sizes, scores[:, 0])

    # -- results ---------------------------------------------------------------------

    def _publish_if_due(self) -> None:
        if not any(s.dirty for s in self._states.values()):
            return
        now = self._clock()
        due = self._published_at + self.drift_settings.interval_s
        if now >= due:
            self._publish(now)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(due - now, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._ready.set()

    def _publish(self, now: float) -> None:
        for state in self._states.values():
            if state.dirty:
                state.observations = report_observations(state.attributes, self._report(state, now))
                state.dirty = False
        merged: dict[str, list[Observation]] = {}
        for state in self._states.values():
            for name, observations in state.observations.items():
                merged.setdefault(name, []).extend(observations)
            if state.drift is not None:
                rows = state.drift.features.rows_seen
                merged.setdefault("ml.drift.rows", []).append(Observation(rows, state.attributes))
            if state.quality is not None:
                matched = {**state.attributes, "result": "matched"}
                merged.setdefault("ml.feedback.labels", []).append(
                    Observation(state.matched, matched)
                )
        for model, count in self._unmatched.items():
            merged.setdefault("ml.feedback.labels", []).append(
                Observation(count, {"model": model, "result": "unmatched"})
            )
        self._published = merged  # one reference swap: the scrape thread sees old or new
        self._published_at = now

    def observations(self, instrument: str) -> list[Observation]:
        """What the gauges export (read on the metrics collection thread)."""
        if instrument == "ml.monitoring.dropped":
            return [Observation(self.dropped, {"reason": "queue_full"})]
        return self._published.get(instrument, [])

    def _report(self, state: MonitoredVersion, now: float) -> dict[str, Any]:
        name, version = state.key
        doc: dict[str, Any] = {"model": name, "version": str(version)}
        sections = []
        if state.drift is not None:
            drift = state.drift.report(now)
            doc.update(drift)
            sections += [drift["data_drift"], drift["prediction_drift"]]
        else:
            absent = {"status": Status.NO_REFERENCE.value, "reason": state.drift_reason}
            doc["data_drift"] = doc["prediction_drift"] = absent
        if state.quality is not None:
            doc["concept_drift"] = state.quality.report()
            sections.append(doc["concept_drift"])
        doc["status"] = worst(Status(s["status"]) for s in sections).value
        return doc

    async def report(self, mv: ModelVersion) -> dict[str, Any]:
        """The current drift, data-quality and concept-drift report of one version."""
        await self.flush()
        return self._report(await self._state(mv), self._clock())

    async def feedback(
        self, model: str, version: int | None, labels: Sequence[Label]
    ) -> FeedbackOutcome:
        """Join labels to stored predictions of ``model`` (and ``version`` when given)."""
        await self.flush()
        outcome = FeedbackOutcome()
        if self._store is None:
            for label in labels:
                outcome.reject(f"id '{label.request_id}': feedback is disabled")
            return outcome
        now = self._clock()
        self._store.expire(now)
        elsewhere: list[Label] = []
        here: list[tuple[Label, StoredPrediction]] = []
        for label in labels:
            stored = self._store.peek(label.request_id)
            if stored is None and self._shared is not None:
                elsewhere.append(label)  # perhaps scored by another replica
            elif stored is None or not _wanted(stored, model, version):
                self._miss(outcome, model, label)
            else:
                here.append((label, stored))
        claimed = None
        if here and self._shared is not None:
            claimed = await self._shared.claim([label.request_id for label, _ in here])
        for index, (label, stored) in enumerate(here):
            self._store.take(label.request_id, now)
            if claimed is not None and not claimed[index]:
                outcome.reject(f"id '{label.request_id}': already joined by another replica")
                continue
            await self._join(outcome, label, stored)
        if elsewhere:
            assert self._shared is not None
            found = await self._shared.take([label.request_id for label in elsewhere], now)
            for label, shared in zip(elsewhere, found, strict=True):
                if shared is None or not _wanted(shared, model, version):
                    self._miss(outcome, model, label)
                    continue
                await self._join(outcome, label, shared)
        self._publish_if_due()
        return outcome

    def share(
        self, store: SharedStore, versions: Callable[[VersionKey], ModelVersion | None]
    ) -> None:
        """Join labels across replicas through ``store``; ``versions`` finds a served version."""
        if self._store is not None:
            self._shared = SharedPredictions(store, self.feedback_settings.retention_s)
            self._versions = versions

    def _miss(self, outcome: FeedbackOutcome, model: str, label: Label) -> None:
        outcome.miss(label.request_id)
        self._unmatched[model] = self._unmatched.get(model, 0) + len(label.values)

    async def _join(self, outcome: FeedbackOutcome, label: Label, stored: StoredPrediction) -> None:
        state = self._states.get(stored.key)
        if state is None:  # scored by another replica only: build this version's state here
            mv = self._versions(stored.key)
            state = await self._state(mv) if mv is not None else None
        problem = rows_match(label, stored)
        if problem is not None or state is None or state.quality is None:
            outcome.reject(problem or f"id '{label.request_id}': version no longer served")
            return
        state.quality.add(stored.scores, label.values)
        state.matched += len(label.values)
        state.dirty = True
        outcome.matched += 1


def _wanted(stored: StoredPrediction, model: str, version: int | None) -> bool:
    return stored.key[0] == model and version in (None, stored.key[1])


def _score_column(mv: ModelVersion, predictions: Mapping[str, Any]) -> Extractor | None:
    """The score labels are compared with: the reference's first numeric output, else
    the first float output (column 1 of a two-column probability output)."""
    for name, profile in predictions.items():
        if isinstance(profile, NumericProfile) and name in mv.signature.output_names:
            return Extractor([Column(name, name, profile.column)])
    for spec in mv.signature.outputs:
        if spec.datatype in FLOAT_TYPES and len(spec.shape) <= 2:
            column = 1 if len(spec.shape) == 2 and spec.shape[1] == 2 else None
            return Extractor([Column(spec.name, spec.name, column)])
    return None
