"""Server settings: one frozen model from a YAML file, ``SLUICE_*`` variables and flags.

Precedence: flags > environment > file > defaults. Validation is eager and a
bad value is reported as one line naming the setting and where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "SLUICE_"


class Settings(BaseModel):
    """Everything ``sluice serve`` and ``sluice batch`` can be told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repository: Path = Field(default=Path("models"), description="model repository root")
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    inference_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=512,
        description="size of the thread pool that runs models",
    )
    batching: bool = Field(default=True, description="global switch for dynamic batching")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    repository_control: bool = Field(
        default=True, description="allow /v2/repository load and unload calls"
    )
    strict_readiness: bool = Field(
        default=False, description="server ready only when every model version is ready"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 503")


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming it and its source."""


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the three sources and validate once."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        for key, value in _read_file(config_file).items():
            merged[key] = value
            sources[key] = f"{config_file}"
    for key, value in (environ if environ is not None else os.environ).items():
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            field = key[len(ENV_PREFIX) :].lower()
            merged[field] = value
            sources[field] = f"environment variable {key}"
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
            sources[key] = f"flag --{key.replace('_', '-')}"
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "(settings)"
        where = sources.get(field, "defaults")
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting '{field}' (from {where})") from exc
        raise ConfigError(f"invalid setting '{field}' (from {where}): {error['msg']}") from exc


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
