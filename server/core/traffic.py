"""The traffic document: which versions of a model take its traffic, and how a canary moves.

A contract: clients, the CLI and tests rely on these names. It is set in
``model.yaml`` (``traffic:``) and replaced whole at run time by ``PUT
/v2/models/{name}/traffic``. Versions are written as strings, as everywhere
in the V2 protocol; integers are accepted too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _version(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or text[0] == "0":
        raise ValueError(f"a version is a positive integer written as a string, got {value!r}")
    return text


class Canary(_Strict):
    version: str
    weight: float = Field(ge=0, le=100, description="percent of unversioned requests")

    _check = field_validator("version", mode="before")(_version)


class Shadow(_Strict):
    version: str
    sample: float = Field(ge=0, le=1, description="share of primary requests copied")

    _check = field_validator("version", mode="before")(_version)


class Analysis(_Strict):
    """When a canary moves on, and when it is rolled back (defaults: README "Traffic")."""

    interval_s: float = Field(default=30.0, gt=0, le=86_400)
    min_requests: int = Field(default=500, ge=1)
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_ratio: float = Field(default=1.5, gt=0)
    min_agreement: float = Field(default=0.98, ge=0, le=1)
    max_score_divergence: float = Field(default=0.1, ge=0, le=1)
    decision_threshold: float = 0.5
    pair_sample: float = Field(
        default=0.2, ge=0, le=1, description="share of canary requests also scored by the primary"
    )
    auto: bool = False

    @model_validator(mode="after")
    def _rising_steps(self) -> Self:
        steps = self.steps
        if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"steps must rise strictly within (0, 100], got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100 (promotion), got {steps[-1]}")
        return self


class TrafficDocument(_Strict):
    """How a model's unversioned requests are split between its versions."""

    primary: str | None = None  # None: the highest ready version
    canary: Canary | None = None
    # Answers when the primary cannot (not ready, or its circuit breaker open). None:
    # the highest other ready version that is neither the canary nor a shadow. A
    # promotion sets it to the old primary.
    fallback: str | None = None
    shadows: list[Shadow] = Field(default_factory=list)
    routing_key_header: str = Field(default="x-routing-key", min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)

    _check = field_validator("primary", "fallback", mode="before")(
        lambda value: None if value is None else _version(value)
    )

    @model_validator(mode="after")
    def _distinct_roles(self) -> Self:
        taken = {self.primary} if self.primary else set()
        if self.canary is not None:
            if self.canary.version == self.primary:
                raise ValueError(f"version {self.primary} cannot be both primary and canary")
            taken.add(self.canary.version)
        if self.fallback is not None and self.fallback in taken:
            raise ValueError(f"fallback version {self.fallback} is also the primary or canary")
        seen: set[str] = set()
        for shadow in self.shadows:
            if shadow.version in taken:
                raise ValueError(f"shadow version {shadow.version} is also the primary or canary")
            if shadow.version in seen:
                raise ValueError(f"version {shadow.version} is a shadow twice")
            seen.add(shadow.version)
        return self

    def versions(self) -> set[int]:
        named = [self.primary, self.fallback, *(s.version for s in self.shadows)]
        if self.canary is not None:
            named.append(self.canary.version)
        return {int(v) for v in named if v is not None}


class RolloutState(StrEnum):
    STABLE = "stable"
    PROGRESSING = "progressing"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    INCONCLUSIVE = "inconclusive"


def parse_document(doc: Any, where: str) -> TrafficDocument:
    """A validated document; ``ValueError`` naming ``where``, the field and the reason."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: the traffic document must be a JSON object")
    try:
        return TrafficDocument.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(document)"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{where}: {field}: {message}") from None
