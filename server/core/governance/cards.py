"""The model card of a version (card.yaml) as a typed view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a version was trained on, how, when, and how well; ``raw`` is the whole card."""

    model: str
    version: int
    sha256: str  # the artifact being served
    description: str = ""
    trained_at: str = ""
    code_revision: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)  # generator, seed, sha256 digests, rows
    metrics: Mapping[str, Any] = field(default_factory=dict)
    card_sha256: str = ""  # the artifact digest the card was written for
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def matches_artifact(self) -> bool:
        """Whether the card describes the artifact being served (True when it names none)."""
        return not self.card_sha256 or self.card_sha256 == self.sha256

    @classmethod
    def of(cls, model: str, version: int, sha256: str, card: Mapping[str, Any]) -> ModelCard:
        artifact = card.get("artifact")
        data = card.get("data")
        metrics = card.get("metrics")
        return cls(
            model=model,
            version=version,
            sha256=sha256,
            description=str(card.get("description") or ""),
            trained_at=str(card.get("trained_at") or ""),
            code_revision=str(card.get("code_revision") or ""),
            data=data if isinstance(data, dict) else {},
            metrics=metrics if isinstance(metrics, dict) else {},
            card_sha256=str(artifact.get("sha256") or "") if isinstance(artifact, dict) else "",
            raw=dict(card),
        )
