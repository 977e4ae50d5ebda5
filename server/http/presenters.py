"""JSON documents of the V2 protocol and its Triton extensions, built from registry state."""

from __future__ import annotations

from typing import Any

from server.core.registry import ModelEntry, ModelVersion, VersionState
from server.core.repository import ModelConfig
from server.core.signature import CONFIG_TYPE_NAMES, TensorSpec

EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]

_PLATFORMS = {"onnx": "onnxruntime_onnx", "xgboost": "xgboost_ubj"}


def platform_of(entry: ModelEntry, mv: ModelVersion | None) -> str:
    if mv is not None and mv.platform:
        return mv.platform
    if mv is not None and mv.source is not None:
        return _PLATFORMS[mv.source.runtime.value]
    if entry.config is not None and entry.config.runtime is not None:
        return _PLATFORMS[entry.config.runtime.value]
    return "unknown"


def model_metadata(
    entry: ModelEntry, mv: ModelVersion | None, versioned: bool = False
) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]``; ``mv`` is the version that would answer."""
    if versioned and mv is not None:
        versions = [str(mv.version)]
    else:
        versions = [str(v) for v in sorted(entry.versions)]
    doc: dict[str, Any] = {"name": entry.name, "versions": versions}
    doc["platform"] = platform_of(entry, mv)
    config = entry.config
    doc["inputs"] = [t.to_spec().to_metadata() for t in config.inputs] if config else []
    doc["outputs"] = [t.to_spec().to_metadata() for t in config.outputs] if config else []
    properties = {"description": config.description if config else ""}
    if mv is not None:
        properties.update(
            version=str(mv.version), state=mv.state.value, reason=mv.reason, sha256=mv.sha256
        )
    else:
        properties.update(state="UNAVAILABLE", reason=entry.error or "no ready version")
    doc["properties"] = properties
    return doc


def model_config(entry: ModelEntry, mv: ModelVersion | None) -> dict[str, Any]:
    """Triton ``ModelConfig`` JSON, as perf_analyzer and tritonclient read it."""
    config = entry.config
    if config is None:
        return {"name": entry.name, "platform": "unknown", "max_batch_size": 0}
    signature = config.signature()
    batched = signature.batched
    doc: dict[str, Any] = {
        "name": entry.name,
        "platform": platform_of(entry, mv),
        "backend": config.runtime.value if config.runtime else platform_of(entry, mv),
        "max_batch_size": config.batching.max_batch_size if batched else 0,
        "input": [_config_tensor(s, batched) for s in signature.inputs],
        "output": [_config_tensor(s, batched) for s in signature.outputs],
        "version_policy": _version_policy(config),
    }
    if batched and config.batching.enabled:
        doc["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(config.batching.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": config.batching.max_queue_size},
        }
    features = signature.inputs[0].feature_names
    if features:
        doc["parameters"] = {"feature_names": {"string_value": ",".join(features)}}
    return doc


def _config_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return {"name": spec.name, "data_type": CONFIG_TYPE_NAMES[spec.datatype], "dims": dims}


def _version_policy(config: ModelConfig) -> dict[str, Any]:
    policy = config.version_policy
    if policy.all:
        return {"all": {}}
    if policy.specific is not None:
        return {"specific": {"versions": policy.specific}}
    return {"latest": {"num_versions": policy.latest or 1}}


def repository_index(models: dict[str, ModelEntry], names: list[str]) -> list[dict[str, str]]:
    """``POST /v2/repository/index``: one row per version, plus models not loaded at all."""
    rows = []
    for name in sorted(set(names) | set(models)):
        entry = models.get(name)
        if entry is None:
            rows.append(
                {"name": name, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"}
            )
            continue
        if not entry.versions:
            reason = entry.error or "no versions"
            rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
        for version, mv in sorted(entry.versions.items()):
            rows.append(
                {
                    "name": name,
                    "version": str(version),
                    "state": mv.state.value,
                    "reason": mv.reason,
                }
            )
    return rows


def is_version_ready(mv: ModelVersion) -> bool:
    return mv.state is VersionState.READY
