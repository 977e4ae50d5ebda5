"""JSON documents of the V2 protocol and its Triton extensions, rendered from the
data plane's typed views."""

from __future__ import annotations

from typing import Any

from server.core.catalog import IndexEntry, ModelInfo, VersionStatistics
from server.core.model_config import ModelConfig
from server.core.signature import CONFIG_TYPE_NAMES, TensorSpec
from server.core.stats import Duration

EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]


def model_metadata(info: ModelInfo, versioned: bool = False) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]``; ``info.chosen`` is the version that would answer."""
    mv = info.chosen
    if versioned and mv is not None:
        versions = [str(mv.version)]
    else:
        versions = [str(v.version) for v in info.versions]
    properties = {"description": info.description}
    if mv is not None:
        properties.update(
            version=str(mv.version), state=mv.state.value, reason=mv.reason, sha256=mv.sha256
        )
        if mv.executors is not None:
            properties["executors"] = mv.executors.summary()
    else:
        properties.update(state="UNAVAILABLE", reason=info.error or "no ready version")
    return {
        "name": info.name,
        "versions": versions,
        "platform": info.platform,
        "inputs": [s.to_metadata() for s in info.inputs],
        "outputs": [s.to_metadata() for s in info.outputs],
        "properties": properties,
    }


def model_config(info: ModelInfo) -> dict[str, Any]:
    """Triton ``ModelConfig`` JSON, as perf_analyzer and tritonclient read it."""
    config = info.config
    if config is None:
        return {"name": info.name, "platform": "unknown", "max_batch_size": 0}
    signature = config.signature()
    batched = signature.batched
    doc: dict[str, Any] = {
        "name": info.name,
        "platform": info.platform,
        "backend": config.runtime.value if config.runtime else info.platform,
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


def repository_index(rows: list[IndexEntry]) -> list[dict[str, str]]:
    """``POST /v2/repository/index``: one row per version, plus models not loaded at all."""
    return [
        {
            "name": row.model,
            "version": "" if row.version is None else str(row.version),
            "state": row.state.value,
            "reason": row.reason,
        }
        for row in rows
    ]


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics(found: VersionStatistics) -> dict[str, object]:
    """One version in the shape of Triton's statistics extension."""
    s = found.stats
    return {
        "name": found.model,
        "version": str(found.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            "cache_hit": _duration(s.cache_hit),
            "cache_miss": _duration(s.cache_miss),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(s.batches.items())
        ],
    }
