"""Model runtimes, chosen from one closed table."""

from __future__ import annotations

from enum import StrEnum

from server.core.runtimes import onnx, xgboost
from server.core.runtimes.base import (
    Executors,
    ExecutorTiming,
    Runtime,
    RuntimeFactory,
    SignatureMismatch,
)
from server.core.runtimes.hybrid import load_xgboost
from server.core.runtimes.onnx import OnnxRuntime
from server.core.runtimes.xgboost import XGBoostRuntime


class RuntimeKind(StrEnum):
    ONNX = "onnx"
    XGBOOST = "xgboost"


RUNTIMES: dict[RuntimeKind, RuntimeFactory] = {
    RuntimeKind.ONNX: OnnxRuntime,
    # XGBoost, plus compiled trees for small batches when they pay (hybrid.py).
    RuntimeKind.XGBOOST: load_xgboost,
}

# Artifact file name -> platform, as each runtime names its own. Pickle-based formats
# are deliberately absent.
PLATFORMS: dict[str, str] = {**onnx.PLATFORMS, **xgboost.PLATFORMS}

# Artifact file name -> runtime.
ARTIFACTS: dict[str, RuntimeKind] = {
    **dict.fromkeys(onnx.PLATFORMS, RuntimeKind.ONNX),
    **dict.fromkeys(xgboost.PLATFORMS, RuntimeKind.XGBOOST),
}

# A runtime's platform when no artifact is known (a version that was never found).
DEFAULT_PLATFORMS: dict[RuntimeKind, str] = {
    RuntimeKind.ONNX: OnnxRuntime.platform,
    RuntimeKind.XGBOOST: XGBoostRuntime.platform,
}

__all__ = [
    "ARTIFACTS",
    "DEFAULT_PLATFORMS",
    "PLATFORMS",
    "RUNTIMES",
    "ExecutorTiming",
    "Executors",
    "Runtime",
    "RuntimeKind",
    "SignatureMismatch",
]
