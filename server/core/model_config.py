"""The schema of ``model.yaml``: frozen, validated eagerly, typed for every reader.

The repository parses files into these; the registry, the router and the
edges read them. Nothing here touches the disk.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.core.runtimes import RuntimeKind
from server.core.signature import Datatype, Signature, TensorSpec
from server.core.traffic import TrafficDocument


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorConfig(_Strict):
    """A tensor as declared in model.yaml."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(min_length=1)
    feature_names: list[str] = Field(default_factory=list)
    allow_nonfinite: bool = False

    @model_validator(mode="after")
    def _shape_and_features(self) -> Self:
        if any(d < -1 for d in self.shape):
            raise ValueError(f"shape {self.shape}: dimensions are >= 0, or -1 for variable")
        if self.feature_names:
            if len(self.shape) != 2 or self.shape[1] != len(self.feature_names):
                raise ValueError(
                    f"{len(self.feature_names)} feature_names need a 2-D shape "
                    f"[-1, {len(self.feature_names)}], got {self.shape}"
                )
            if len(set(self.feature_names)) != len(self.feature_names):
                raise ValueError("feature_names must be unique")
        return self

    def to_spec(self) -> TensorSpec:
        return TensorSpec(
            name=self.name,
            datatype=self.datatype,
            shape=tuple(self.shape),
            feature_names=tuple(self.feature_names),
            allow_nonfinite=self.allow_nonfinite,
        )


class BatchingConfig(_Strict):
    """Dynamic micro-batching of concurrent requests (sizes count rows, not requests)."""

    enabled: bool = True
    max_batch_size: int = Field(default=64, ge=1, le=1_000_000)
    max_queue_delay_ms: float = Field(default=1.0, ge=0, le=10_000)
    max_queue_size: int = Field(default=1024, ge=1)
    # None: one per inference thread. More than the threads only queues formed batches
    # in the pool, where they stop collecting requests (at 64 clients on one CPU, 2
    # batches in flight for 1 thread gave batches half the size and 15 % less throughput).
    max_batches_in_flight: int | None = Field(default=None, ge=1, le=64)
    # Admission (server.core.admission): a request predicted to queue longer than this
    # is refused with 503 at once. None: adapted to the model (its batching delay plus
    # four batch times, at least 20 ms).
    target_queue_delay_ms: float | None = Field(default=None, gt=0, le=60_000)


class CacheConfig(_Strict):
    """The per-row result cache of a model (off unless the model turns it on).

    Bounds are per version: whichever of ``max_entries`` and ``max_bytes`` is
    reached first evicts the least recently used rows. ``ttl_s`` bounds how long
    a row is served from the cache, in memory and in Redis.
    """

    enabled: bool = False
    ttl_s: float = Field(default=900.0, gt=0, le=30 * 86400)
    max_entries: int = Field(default=100_000, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)


class BreakerConfig(_Strict):
    """The circuit breaker of each version (defaults: README "Circuit breaker").

    Opens when, over the last ``window_s``, at least ``min_calls`` requests ran
    and ``failure_rate`` of them failed; half-open after ``cooldown_s``, when
    ``probes`` requests are let through; each failed round of probes doubles
    the cooldown, up to ``max_cooldown_s``.
    """

    enabled: bool = True
    window_s: float = Field(default=10.0, ge=1, le=600)
    min_calls: int = Field(default=20, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    cooldown_s: float = Field(default=5.0, gt=0, le=3600)
    max_cooldown_s: float = Field(default=60.0, gt=0, le=86_400)
    probes: int = Field(default=5, ge=1, le=1000)

    @model_validator(mode="after")
    def _cooldowns(self) -> Self:
        if self.cooldown_s > self.max_cooldown_s:
            raise ValueError(
                f"cooldown_s {self.cooldown_s:g} exceeds max_cooldown_s {self.max_cooldown_s:g}"
            )
        return self


class VersionPolicy(_Strict):
    """Which version folders are served: exactly one of the three forms."""

    latest: int | None = Field(default=None, ge=1)
    all: bool | None = None
    specific: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) not in (None, False)]
        if len(chosen) > 1:
            raise ValueError(f"use exactly one of latest / all / specific, got {chosen}")
        return self


class ModelConfig(_Strict):
    """The contents of one model.yaml."""

    description: str = ""
    runtime: RuntimeKind | None = None
    inputs: list[TensorConfig] = Field(min_length=1)
    outputs: list[TensorConfig] = Field(min_length=1)
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    traffic: TrafficDocument | None = None
    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=1))

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        return self

    def signature(self) -> Signature:
        return Signature(
            inputs=tuple(t.to_spec() for t in self.inputs),
            outputs=tuple(t.to_spec() for t in self.outputs),
        )
