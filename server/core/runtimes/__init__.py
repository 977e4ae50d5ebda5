"""Model runtimes, chosen from one closed table."""

from __future__ import annotations

from enum import StrEnum

from server.core.runtimes.base import Runtime, RuntimeFactory, SignatureMismatch
from server.core.runtimes.onnx import OnnxRuntime
from server.core.runtimes.xgboost import XGBoostRuntime


class RuntimeKind(StrEnum):
    ONNX = "onnx"
    XGBOOST = "xgboost"


RUNTIMES: dict[RuntimeKind, RuntimeFactory] = {
    RuntimeKind.ONNX: OnnxRuntime,
    RuntimeKind.XGBOOST: XGBoostRuntime,
}

# Artifact file name -> runtime. Pickle-based formats are deliberately absent.
ARTIFACTS: dict[str, RuntimeKind] = {
    "model.onnx": RuntimeKind.ONNX,
    "model.ubj": RuntimeKind.XGBOOST,
    "model.json": RuntimeKind.XGBOOST,
}

__all__ = ["ARTIFACTS", "RUNTIMES", "Runtime", "RuntimeKind", "SignatureMismatch"]
