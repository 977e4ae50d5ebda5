"""Governance: approvals, the audit log and the prediction log (README "Governance")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.config import Settings
from server.core.governance.approvals import (
    Approval,
    ApprovalSource,
    ApprovalStore,
    card_approval,
    new_approval,
)
from server.core.governance.audit import Action, AuditLog, AuditRecord
from server.core.governance.predictions import PredictionLog
from server.errors import InvalidInput

if TYPE_CHECKING:
    from server.core.registry import ModelRegistry

__all__ = [
    "Action",
    "Approval",
    "ApprovalSource",
    "AuditLog",
    "AuditRecord",
    "Governance",
    "PredictionLog",
]


@dataclass(slots=True)
class Governance:
    """What the data plane needs for governance; the writers exist only in a server."""

    approvals: ApprovalStore
    require_approval: bool = False
    audit: AuditLog | None = None
    predictions: PredictionLog | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, writers: bool) -> Governance:
        """The approvals store always; with ``writers``, the audit and prediction logs."""
        config = settings.governance
        repository = settings.model_repository
        audit = predictions = None
        if writers:
            audit = AuditLog(config.audit_path(repository), rotate_bytes=config.rotate_bytes)
            if config.prediction_log is not None:
                predictions = PredictionLog(config.prediction_log, config)
        return cls(
            ApprovalStore(config.state_path(repository)),
            config.require_approval,
            audit,
            predictions,
        )

    def approval(
        self, model: str, version: int, sha256: str, card: Mapping[str, Any]
    ) -> Approval | None:
        """The admin approval of this artifact, else the card's, else None."""
        found = self.approvals.get(model, version, sha256)
        return found if found is not None else card_approval(model, version, card)

    def approve(
        self,
        model: str,
        version: int,
        sha256: str,
        actor: str,
        reason: str,
        figures: Mapping[str, Any] | None = None,
    ) -> Approval:
        """Persist an admin approval and audit it (blocking: run it off the event loop)."""
        actor, reason = actor.strip(), reason.strip()
        if not actor or not reason:
            raise InvalidInput("an approval needs a non-empty 'actor' and 'reason'")
        approval = new_approval(model, version, actor, reason, sha256)
        self.approvals.add(approval)
        if self.audit is not None:
            self.audit.record(
                Action.APPROVE,
                model,
                version,
                actor=actor,
                reason=reason,
                figures={"sha256": sha256, **(figures or {})},
            )
        return approval

    def audit_hook(
        self,
        actor: str,
        action: str,
        model: str,
        version: int | None,
        reason: str,
        figures: Mapping[str, Any],
    ) -> None:
        """``AuditLog.record`` in the shape of the traffic steering's hook (a no-op unaudited)."""
        if self.audit is not None:
            self.audit.record(action, model, version, actor=actor, reason=reason, figures=figures)

    def approval_check(self, registry: ModelRegistry) -> Callable[[str, int], bool]:
        """Whether a served version is approved, for validating a traffic document."""

        def approved(model: str, version: int) -> bool:
            mv = registry.version((model, version))
            if mv is None:
                return False
            card = mv.source.card if mv.source is not None else {}
            return self.approval(model, version, mv.sha256, card) is not None

        return approved

    def close(self) -> None:
        """Write what is queued and stop the writer threads."""
        if self.predictions is not None:
            self.predictions.close()
        if self.audit is not None:
            self.audit.close()
