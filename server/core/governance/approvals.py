"""Approvals: who approved a version, when and why, for the artifact they saw.

A version is approved by ``approved_by`` in its card.yaml (with optional
``approved_at`` and ``approval_reason``), or by an admin approval appended to
``<state_dir>/approvals.jsonl``. An admin approval names the artifact's sha256:
if the artifact changes, the approval no longer applies. The file is re-read
when it changes, so an approval written by another process (a worker, the
CLI) counts at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from server.core.governance.audit import parse_time, utc_iso
from server.core.governance.jsonl import JsonLinesFile, read_records

APPROVALS_FILE = "approvals.jsonl"


class ApprovalSource(StrEnum):
    CARD = "card"  # approved_by in card.yaml
    ADMIN = "admin"  # an approve call (HTTP or CLI)


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval of one version."""

    model: str
    version: int
    actor: str
    reason: str
    ts: float | None  # None: the card gives no time
    source: ApprovalSource
    sha256: str = ""  # the artifact approved; empty for card approvals (the card is its own)

    @property
    def time(self) -> str:
        return utc_iso(self.ts) if self.ts is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "time": self.time,
            "ts": self.ts,
            "source": self.source.value,
            "sha256": self.sha256,
        }


def card_approval(model: str, version: int, card: Mapping[str, Any]) -> Approval | None:
    """The approval a model card carries, if any."""
    actor = card.get("approved_by")
    if not actor:
        return None
    at = card.get("approved_at")
    ts: float | None = None
    if at is not None:
        try:
            ts = parse_time(str(at)) if not hasattr(at, "timestamp") else at.timestamp()
        except ValueError:
            ts = None
    reason = str(card.get("approval_reason") or "approved_by in the model card")
    return Approval(model, version, str(actor), reason, ts, ApprovalSource.CARD)


class ApprovalStore:
    """Admin approvals on disk; reads are cached until the file changes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / APPROVALS_FILE
        self._seen: tuple[int, int, int] | None = None
        self._by_version: dict[tuple[str, int], list[Approval]] = {}

    def add(self, approval: Approval) -> None:
        """Append one approval and fsync it (blocking: call it off the event loop)."""
        file = JsonLinesFile(self.path, rotate_bytes=1 << 62, fsync=True)
        try:
            file.append(orjson.dumps(approval.to_dict(), option=orjson.OPT_APPEND_NEWLINE))
        finally:
            file.close()

    def get(
        self, model: str, version: int, sha256: str = "", at: float | None = None
    ) -> Approval | None:
        """The latest admin approval of ``model`` version ``version`` for artifact ``sha256``.

        With ``at``, the latest one given at or before that time.
        """
        self._refresh()
        found = None
        for approval in self._by_version.get((model, version), ()):
            if sha256 and approval.sha256 and approval.sha256 != sha256:
                continue
            if at is not None and approval.ts is not None and approval.ts > at:
                continue
            found = approval
        return found

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._by_version = None, {}
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        by_version: dict[tuple[str, int], list[Approval]] = {}
        for doc in read_records(self.path):
            try:
                approval = Approval(
                    model=str(doc["model"]),
                    version=int(doc["version"]),
                    actor=str(doc["actor"]),
                    reason=str(doc.get("reason", "")),
                    ts=float(doc["ts"]) if doc.get("ts") is not None else None,
                    source=ApprovalSource.ADMIN,
                    sha256=str(doc.get("sha256", "")),
                )
            except (KeyError, TypeError, ValueError):
                continue
            by_version.setdefault((approval.model, approval.version), []).append(approval)
        self._seen, self._by_version = seen, by_version


def new_approval(model: str, version: int, actor: str, reason: str, sha256: str) -> Approval:
    """An admin approval made now."""
    return Approval(model, version, actor, reason, time.time(), ApprovalSource.ADMIN, sha256)
