"""What the data plane tells an edge about models: typed, immutable views, no dicts.

Each edge renders these in its own protocol (V2 JSON, Triton config, a CLI
table); none of them reads the registry or the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from server.core.model_config import ModelConfig
from server.core.runtimes.base import Executors
from server.core.signature import TensorSpec
from server.core.stats import VersionStats


class VersionState(StrEnum):
    """Where one version of a model is in its life."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version as served: its state, the reason when not ready, its artifact."""

    model: str
    version: int
    state: VersionState
    reason: str
    platform: str
    runtime: str  # the runtime kind ("onnx", "xgboost"); empty when no artifact was found
    sha256: str
    # What runs the version's batches and where the switch-over lies; None when not loaded.
    executors: Executors | None = None

    @property
    def ready(self) -> bool:
        return self.state is VersionState.READY


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model with the versions its policy selects.

    ``chosen`` is the version a request would reach: the one asked for, else
    the one the router sends unversioned requests to, else the highest one
    (so that a model with no ready version still describes itself).
    """

    name: str
    config: ModelConfig | None
    error: str
    versions: tuple[VersionInfo, ...]
    chosen: VersionInfo | None
    platform: str

    @property
    def description(self) -> str:
        return self.config.description if self.config else ""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.to_spec() for t in self.config.inputs) if self.config else ()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.to_spec() for t in self.config.outputs) if self.config else ()


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a model (version) can serve, and why not."""

    model: str
    ready: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a version, or a model with none."""

    model: str
    version: int | None
    state: VersionState
    reason: str


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    """The cumulative statistics of one version."""

    model: str
    version: int
    stats: VersionStats
