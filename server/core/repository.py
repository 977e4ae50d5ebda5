"""The model repository on disk: ``<root>/<model>/model.yaml`` and integer version folders.

This module only reads files. Loading runtimes and serving is the registry's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.core.runtimes import ARTIFACTS, RuntimeKind
from server.core.signature import Datatype, Signature, TensorSpec
from server.errors import ModelNotFound

MODEL_FILE = "model.yaml"


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

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve, ascending."""
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific)]
        return ordered[-(self.latest or 1) :]


class ModelConfig(_Strict):
    """The contents of one model.yaml."""

    description: str = ""
    runtime: RuntimeKind | None = None
    inputs: list[TensorConfig] = Field(min_length=1)
    outputs: list[TensorConfig] = Field(min_length=1)
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
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


class RepositoryError(Exception):
    """A model or version on disk is unusable; the message says why."""


@dataclass(frozen=True, slots=True)
class VersionSource:
    """One version folder as found on disk."""

    model: str
    version: int
    path: Path
    artifact: Path
    runtime: RuntimeKind
    sha256: str
    card: dict[str, Any]

    @property
    def reference_path(self) -> Path:
        return self.path / "reference.json"


class ModelRepository:
    """Reads models and versions from a directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Every folder holding a model.yaml, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MODEL_FILE).is_file())

    def model_path(self, name: str) -> Path:
        path = self.root / name
        if "/" in name or name.startswith(".") or not (path / MODEL_FILE).is_file():
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return path

    def read_config(self, name: str) -> ModelConfig:
        """Parse and validate model.yaml; RepositoryError names the file and field."""
        path = self.model_path(name) / MODEL_FILE
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise RepositoryError(f"{path}: cannot read YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise RepositoryError(f"{path}: expected a mapping at the top level")
        try:
            return ModelConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise RepositoryError(f"{path}: {field}: {first['msg']}") from exc

    def versions_on_disk(self, name: str) -> list[int]:
        """Integer-named subfolders of the model folder, ascending."""
        path = self.model_path(name)
        return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())

    def read_version(self, name: str, version: int, config: ModelConfig) -> VersionSource:
        """Locate the artifact of one version, hash it and read its card."""
        path = self.model_path(name) / str(version)
        if not path.is_dir():
            raise RepositoryError(f"{path}: version folder does not exist")
        found = [p for p in sorted(path.iterdir()) if p.name in ARTIFACTS]
        if not found:
            raise RepositoryError(
                f"{path}: no model artifact (expected one of {', '.join(sorted(ARTIFACTS))})"
            )
        if len(found) > 1:
            raise RepositoryError(
                f"{path}: ambiguous, several artifacts: {', '.join(p.name for p in found)}"
            )
        artifact = found[0]
        runtime = ARTIFACTS[artifact.name]
        if config.runtime is not None and config.runtime is not runtime:
            raise RepositoryError(
                f"{path}: model.yaml says runtime '{config.runtime.value}' "
                f"but the artifact {artifact.name} is for '{runtime.value}'"
            )
        return VersionSource(
            model=name,
            version=version,
            path=path,
            artifact=artifact,
            runtime=runtime,
            sha256=file_sha256(artifact),
            card=_read_card(path / "card.yaml"),
        )


def _read_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        card = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RepositoryError(f"{path}: cannot read model card: {exc}") from exc
    return card if isinstance(card, dict) else {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
