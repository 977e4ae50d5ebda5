"""Steering a model's traffic: set the document, move the canary, promote, roll back.

``Steering`` validates a traffic document against what is served, applies it
to the router, persists it (beside the repository, or in Redis for a fleet)
and runs the analysis loop: every ``TICK_S`` it applies documents written by
other processes, and for each canary under ``analysis.auto`` it rolls back at
the first breach once ``min_requests`` canary requests were seen, and moves
to the next step when an ``interval_s`` has passed with every limit holding.
At the last step (100) the canary becomes the primary; the old primary stays
loaded (and is the fallback while the new one is not ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from server.core.catalog import VersionState
from server.core.registry import ModelRegistry
from server.core.rollout import ArmReport, Rollout, Status, Verdict
from server.core.routing import Router
from server.core.store import SharedStore
from server.core.traffic import Canary, RolloutState, TrafficDocument, parse_document
from server.errors import InvalidInput

log = logging.getLogger("sluice.traffic")

TICK_S = 1.0

# Who may say what happened: the audit log, once it is wired (see server/core/governance).
AuditHook = Callable[[str, str, str, int | None, str, dict[str, Any]], None]
ApprovalCheck = Callable[[str, int], bool]


@dataclass(frozen=True, slots=True)
class TrafficView:
    """What ``GET /v2/models/{name}/traffic`` shows."""

    model: str
    document: TrafficDocument
    state: RolloutState
    step: int | None  # the weight of the current step, when progressing
    reason: str
    paused: bool
    last_analysis: Verdict | None
    versions: tuple[ArmReport, ...]
    breakers: dict[int, dict[str, Any]]  # each served version's circuit breaker


class TrafficStates:
    """Persisted traffic documents: files beside the repository, or the shared store."""

    def __init__(self, root: Path, store: SharedStore | None) -> None:
        self._dir = root / ".sluice" / "traffic"
        self._store = store

    async def read(self, model: str) -> dict[str, Any] | None:
        raw: bytes | None = None
        if self._store is not None:
            raw = await self._store.get(self._store.key("traffic", model))
        if raw is None:
            path = self._dir / f"{model}.json"
            raw = await asyncio.to_thread(_read_bytes, path)
        if raw is None:
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("ignored a corrupt traffic state for %s", model)
            return None
        return doc if isinstance(doc, dict) else None

    async def write(self, model: str, state: dict[str, Any]) -> None:
        raw = orjson.dumps(state)
        if self._store is not None:
            await self._store.set(self._store.key("traffic", model), raw)
        await asyncio.to_thread(_write_atomic, self._dir / f"{model}.json", raw)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(raw)
    temporary.replace(path)


class Steering:
    """The traffic documents and rollouts of every model."""

    def __init__(
        self,
        registry: ModelRegistry,
        states: TrafficStates,
        *,
        audit: AuditHook | None = None,
        approved: ApprovalCheck | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._router: Router = registry.router
        self._states = states
        self._audit = audit
        self._approved = approved
        self._clock = clock
        self.rollout = Rollout(clock)
        self.watched: set[str] = set()  # models with a canary or shadows
        self._revisions: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    # -- reading --------------------------------------------------------------------------

    def view(self, name: str) -> TrafficView:
        doc = self._router.traffic(name)
        status = self.rollout.status.get(name, Status())
        roles = {int(s.version): "shadow" for s in doc.shadows}
        if doc.canary is not None:
            roles[int(doc.canary.version)] = "canary"
        primary = self._router.shown(name)
        reports = self.rollout.reports(name, primary.version if primary else None, roles)
        progressing = status.state is RolloutState.PROGRESSING and doc.canary is not None
        return TrafficView(
            name,
            doc,
            status.state,
            int(doc.canary.weight) if progressing and doc.canary else None,
            status.reason,
            status.paused,
            status.last,
            tuple(reports),
            {
                v: mv.breaker.describe()
                for v, mv in sorted(self._router.entry(name).versions.items())
                if mv.breaker is not None
            },
        )

    # -- changing -------------------------------------------------------------------------

    async def put(self, name: str, raw: Any, actor: str, reason: str = "") -> TrafficView:
        """Replace ``name``'s traffic document whole; ``InvalidInput`` says what is wrong."""
        try:
            doc = parse_document(raw, f"model '{name}' traffic")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        self._check_versions(name, doc)
        state = (
            RolloutState.PROGRESSING
            if doc.canary and doc.canary.weight > 0
            else RolloutState.STABLE
        )
        await self._apply(name, doc, Status(state, self._step_of(doc), reason or "set by " + actor))
        self._record(actor, "traffic", name, None, reason, {"document": doc.model_dump()})
        return self.view(name)

    async def promote(
        self, name: str, actor: str, reason: str = "", last: Verdict | None = None
    ) -> TrafficView:
        doc = self._router.traffic(name)
        if doc.canary is None:
            raise InvalidInput(f"model '{name}' has no canary to promote")
        # The old primary stays loaded and answers whenever the new one cannot.
        old = doc.primary or self._primary_version(name)
        fallback = old if old is not None and old != doc.canary.version else doc.fallback
        if fallback == doc.canary.version:
            fallback = None
        promoted = doc.model_copy(
            update={"primary": doc.canary.version, "canary": None, "fallback": fallback}
        )
        why = reason or f"promoted by {actor}"
        await self._apply(name, promoted, Status(RolloutState.PROMOTED, -1, why, last))
        self._record(actor, "promote", name, int(doc.canary.version), why, _figures(last))
        return self.view(name)

    async def rollback(
        self, name: str, actor: str, reason: str = "", last: Verdict | None = None
    ) -> TrafficView:
        doc = self._router.traffic(name)
        if doc.canary is None:
            raise InvalidInput(f"model '{name}' has no canary to roll back")
        stopped = doc.model_copy(update={"canary": Canary(version=doc.canary.version, weight=0)})
        why = reason or f"rolled back by {actor}"
        # ``last`` in the new status itself: a reader never sees the rollback without it.
        await self._apply(name, stopped, Status(RolloutState.ROLLED_BACK, -1, why, last))
        self._record(actor, "rollback", name, int(doc.canary.version), why, _figures(last))
        return self.view(name)

    async def pause(
        self, name: str, actor: str, reason: str = "", paused: bool = True
    ) -> TrafficView:
        status = self.rollout.status.setdefault(name, Status())
        status.paused = paused
        status.reason = reason or f"{'paused' if paused else 'resumed'} by {actor}"
        await self._persist(name, self._router.traffic(name), status)
        self._record(actor, "pause" if paused else "resume", name, None, status.reason, {})
        return self.view(name)

    def _primary_version(self, name: str) -> str | None:
        route = self._router.primary(name)
        return str(route.serving.version) if route is not None else None

    def _check_versions(self, name: str, doc: TrafficDocument) -> None:
        entry = self._router.entry(name)
        roles = [("primary", doc.primary), ("canary", doc.canary.version if doc.canary else None)]
        roles += [("fallback", doc.fallback)] + [("shadow", s.version) for s in doc.shadows]
        for role, version in roles:
            if version is None:
                continue
            mv = entry.versions.get(int(version))
            if mv is None:
                served = ", ".join(str(v) for v in sorted(entry.versions)) or "none"
                raise InvalidInput(
                    f"model '{name}' traffic: {role} version {version} is not served "
                    f"(served versions: {served})"
                )
            if mv.state is not VersionState.READY:
                raise InvalidInput(
                    f"model '{name}' traffic: {role} version {version} is not ready: {mv.reason}"
                )
            if (
                role in ("primary", "canary")
                and self._approved is not None
                and not self._approved(name, mv.version)
            ):
                raise InvalidInput(
                    f"model '{name}' traffic: {role} version {version} is not approved "
                    "(governance.require_approval)"
                )

    @staticmethod
    def _step_of(doc: TrafficDocument) -> int:
        if doc.canary is None:
            return -1
        steps = doc.analysis.steps
        below = [i for i, s in enumerate(steps) if s <= doc.canary.weight]
        return below[-1] if below else -1

    async def _apply(self, name: str, doc: TrafficDocument, status: Status) -> None:
        self._install(name, doc, status)
        await self._persist(name, doc, status)

    def _install(self, name: str, doc: TrafficDocument, status: Status) -> None:
        """Route by ``doc`` from now on; the rollout's figures start anew."""
        status.step_started = self._clock()
        self._router.set_traffic(name, doc)
        self.rollout.status[name] = status
        self.rollout.watch(name, doc.analysis.decision_threshold)
        self._watch(name, doc)

    def _watch(self, name: str, doc: TrafficDocument) -> None:
        if (doc.canary is not None and doc.canary.weight > 0) or doc.shadows:
            self.watched.add(name)
        else:
            self.watched.discard(name)

    async def _persist(self, name: str, doc: TrafficDocument, status: Status) -> None:
        revision = self._revisions.get(name, 0) + 1
        self._revisions[name] = revision
        await self._states.write(
            name,
            {
                "revision": revision,
                "written_at": self._clock(),
                "document": doc.model_dump(),
                "state": status.state.value,
                "step": status.step,
                "reason": status.reason,
                "paused": status.paused,
            },
        )

    def _record(
        self, actor: str, action: str, model: str, version: int | None, reason: str, figures: Any
    ) -> None:
        log.info("traffic %s %s by %s: %s", action, model, actor, reason)
        if self._audit is not None:
            self._audit(actor, action, model, version, reason, figures)

    # -- the loop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Apply the persisted documents (model.yaml's where none is), then start the loop."""
        for name in list(self._registry.models):
            await self._adopt(name)
            self._watch(name, self._router.traffic(name))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.rollout.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)  # the analysis cadence, not a synchronisation
            for name in list(self._registry.models):
                with contextlib.suppress(Exception):
                    await self._adopt(name)
                try:
                    await self._analyse(name)
                except Exception:
                    log.exception("traffic analysis of %s failed", name)

    async def _adopt(self, name: str) -> None:
        """Apply a document another process wrote (a newer revision than ours)."""
        state = await self._states.read(name)
        if state is None or state.get("revision", 0) <= self._revisions.get(name, 0):
            return
        try:
            doc = TrafficDocument.model_validate(state["document"])
            status = Status(
                RolloutState(state.get("state", "stable")),
                int(state.get("step", -1)),
                str(state.get("reason", "")),
                paused=bool(state.get("paused", False)),
            )
            self._router.entry(name)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored the persisted traffic of %s: %s", name, exc)
            return
        self._revisions[name] = int(state["revision"])
        self._install(name, doc, status)  # not persisted again: another process wrote it

    async def _analyse(self, name: str) -> None:
        doc = self._router.traffic(name)
        status = self.rollout.status.get(name)
        canary = doc.canary
        if status is None or canary is None or canary.weight == 0 or not doc.analysis.auto:
            return
        moving = (RolloutState.PROGRESSING, RolloutState.INCONCLUSIVE)
        if status.paused or status.state not in moving:
            return
        primary = self._router.shown(name)
        if primary is None:
            return
        analysis = doc.analysis
        verdict = self.rollout.judge(
            name, primary.version, int(canary.version), canary.weight, analysis
        )
        served = self._registry.version((name, int(canary.version)))
        breaker = served.breaker if served is not None else None
        if breaker is not None and not breaker.closed:
            # Its requests already go to the primary: a breach whatever the sample size.
            why = f"circuit breaker open: {breaker.reason}"
            verdict = dataclasses.replace(verdict, verdict="breach", reasons=(why,))
        status.last = verdict
        due = self._clock() - status.step_started >= analysis.interval_s
        if verdict.verdict == "breach":
            await self.rollback(name, "analysis", "; ".join(verdict.reasons), verdict)
            return
        if not due:
            return
        if verdict.verdict == "inconclusive":
            status.state = RolloutState.INCONCLUSIVE
            status.reason = verdict.reasons[0]
            return
        steps = analysis.steps
        following = [s for s in steps if s > canary.weight]
        if not following:
            await self.promote(name, "analysis", "every step held its limits", verdict)
            return
        moved = doc.model_copy(
            update={"canary": Canary(version=canary.version, weight=following[0])}
        )
        why = f"step to {following[0]:g} %: every limit held at {canary.weight:g} %"
        await self._apply(
            name, moved, Status(RolloutState.PROGRESSING, steps.index(following[0]), why)
        )
        self._record("analysis", "step", name, int(canary.version), why, _figures(verdict))


def _figures(verdict: Verdict | None) -> dict[str, Any]:
    """What the audit record of a traffic change holds of the analysis behind it."""
    if verdict is None:
        return {}
    return {"verdict": verdict.verdict, "reasons": list(verdict.reasons)}
