"""The audit log: every load, unload, traffic change, step, promotion, rollback,
breaker trip and approval, one fsync'd JSON line each.

``AuditLog.record`` is the one call; it returns at once (a writer thread does
the file work), so it is safe on the event loop. A record::

    {"time": "2026-12-01T08:05:51.123456Z", "ts": 1796112351.123456,
     "action": "approve", "model": "fraud", "version": 2, "actor": "alice",
     "reason": "validated on Q3 holdout", "figures": {"sha256": "..."},
     "host": "scorer-1", "pid": 4242}
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from server.core.catalog import VersionState
from server.core.governance.jsonl import JsonLinesFile, LineWriter, read_records

if TYPE_CHECKING:
    from server.core.registry import ModelEntry


class Action(StrEnum):
    """What an audit record is about."""

    LOAD = "load"
    UNLOAD = "unload"
    TRAFFIC = "traffic"  # the traffic document changed
    STEP = "step"  # an analysis moved the canary weight
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    PAUSE = "pause"  # a rollout paused or resumed by hand
    RESUME = "resume"
    BREAKER = "breaker"  # a circuit breaker opened or closed
    APPROVE = "approve"


def utc_iso(ts: float) -> str:
    """``ts`` (epoch seconds) as ISO 8601 UTC with microseconds and a ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An ISO 8601 time (``Z`` or an offset; naive means UTC) or epoch seconds, as epoch."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit event; ``figures`` are the numbers that drove it."""

    ts: float
    action: str
    model: str
    version: int | None
    actor: str
    reason: str
    figures: Mapping[str, Any] = field(default_factory=dict)
    host: str = ""
    pid: int = 0

    @property
    def time(self) -> str:
        return utc_iso(self.ts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "ts": self.ts,
            "action": self.action,
            "model": self.model,
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "figures": dict(self.figures),
            "host": self.host,
            "pid": self.pid,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> AuditRecord:
        version = doc.get("version")
        figures = doc.get("figures")
        return cls(
            ts=float(doc.get("ts") or 0.0),
            action=str(doc.get("action", "")),
            model=str(doc.get("model", "")),
            version=int(version) if isinstance(version, int | str) and str(version) else None,
            actor=str(doc.get("actor", "")),
            reason=str(doc.get("reason", "")),
            figures=figures if isinstance(figures, dict) else {},
            host=str(doc.get("host", "")),
            pid=int(doc.get("pid") or 0),
        )


def _line(record: AuditRecord) -> bytes:
    return orjson.dumps(
        record.to_dict(),
        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY,
        default=str,
    )


class AuditLog:
    """Appends audit records from any coroutine without blocking it."""

    def __init__(self, path: Path, *, rotate_bytes: int, queue_size: int = 10_000) -> None:
        self.path = path
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._writer = LineWriter(
            JsonLinesFile(path, rotate_bytes=rotate_bytes, fsync=True),
            _line,
            queue_size=queue_size,
            per_record=True,
            name="sluice-audit",
        )

    def record(
        self,
        action: Action | str,
        model: str,
        version: int | None = None,
        *,
        actor: str = "system",
        reason: str = "",
        figures: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one record (queued: returns at once; the writer thread fsyncs it)."""
        self._writer.put(
            AuditRecord(
                ts=time.time(),
                action=str(action),
                model=model,
                version=version,
                actor=actor,
                reason=reason,
                figures=dict(figures or {}),
                host=self._host,
                pid=self._pid,
            )
        )

    def record_entry(self, action: Action, entry: ModelEntry, *, actor: str, reason: str) -> None:
        """One record per version of a model just loaded or unloaded, with its state."""
        if action is Action.LOAD and entry.reload_error:
            reason = f"{reason}: {entry.reload_error}"
        if not entry.versions:
            self.record(action, entry.name, actor=actor, reason=entry.error or reason)
        for number, mv in sorted(entry.versions.items()):
            failed = action is Action.LOAD and mv.state is not VersionState.READY
            self.record(
                action,
                entry.name,
                number,
                actor=actor,
                reason=f"{reason}: {mv.reason}" if failed else reason,
                figures={"state": mv.state.value, "sha256": mv.sha256, "platform": mv.platform},
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record so far is on disk; False on timeout."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close()

    @property
    def dropped(self) -> int:
        return self._writer.dropped


def read_audit(path: Path) -> Iterator[AuditRecord]:
    """Every audit record of ``path`` and its rotated files, oldest first."""
    for doc in read_records(path):
        yield AuditRecord.from_dict(doc)


def select(
    records: Iterable[AuditRecord],
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[AuditRecord]:
    return [
        r
        for r in records
        if (model is None or r.model == model)
        and (since is None or r.ts >= since)
        and (until is None or r.ts <= until)
    ]
