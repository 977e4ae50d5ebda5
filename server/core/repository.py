"""The model repository on disk: ``<root>/<model>/model.yaml`` and integer version folders.

This module only reads files. Loading runtimes and serving is the registry's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from server.core.model_config import ModelConfig
from server.core.runtimes import ARTIFACTS, RuntimeKind
from server.errors import ModelNotFound

MODEL_FILE = "model.yaml"


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
            raise ModelNotFound.model(name)
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
