"""Model runtimes, chosen from one closed table.

Each runtime's module (and the library under it: ONNX Runtime, XGBoost) is
imported when the first version of its kind loads, never at import time: a
process that scores an XGBoost model does not import ONNX Runtime, and the
reverse. Everything else here (kinds, artifact names, platforms) is plain data.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from server.core.runtimes.base import (
    Executors,
    ExecutorTiming,
    Runtime,
    RuntimeFactory,
    SignatureMismatch,
)
from server.core.signature import Signature


class RuntimeKind(StrEnum):
    ONNX = "onnx"
    XGBOOST = "xgboost"


class DeferredFactory:
    """A runtime factory named ``module:attribute``, imported on its first call."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._factory: RuntimeFactory | None = None
        self._lock = threading.Lock()

    def resolve(self) -> RuntimeFactory:
        """Import the factory now (versions load in the thread pool, so under a lock)."""
        with self._lock:
            if self._factory is None:
                module, _, name = self.target.partition(":")
                self._factory = getattr(importlib.import_module(module), name)
            return self._factory

    def __call__(
        self,
        artifact: Path,
        signature: Signature,
        options: Mapping[str, Any],
        *,
        isolated: bool = False,
    ) -> Runtime:
        factory = self._factory or self.resolve()
        return factory(artifact, signature, options, isolated=isolated)


RUNTIMES: dict[RuntimeKind, DeferredFactory] = {
    RuntimeKind.ONNX: DeferredFactory("server.core.runtimes.onnx:OnnxRuntime"),
    # XGBoost, plus compiled trees for small batches when they pay (hybrid.py).
    RuntimeKind.XGBOOST: DeferredFactory("server.core.runtimes.hybrid:load_xgboost"),
}

# Artifact file name -> platform, as each runtime names its own (the runtime modules
# read theirs from here). Pickle-based formats are deliberately absent.
ONNX_PLATFORMS: dict[str, str] = {"model.onnx": "onnxruntime_onnx"}
XGBOOST_PLATFORMS: dict[str, str] = {"model.ubj": "xgboost_ubj", "model.json": "xgboost_json"}
PLATFORMS: dict[str, str] = {**ONNX_PLATFORMS, **XGBOOST_PLATFORMS}

# Artifact file name -> runtime.
ARTIFACTS: dict[str, RuntimeKind] = {
    **dict.fromkeys(ONNX_PLATFORMS, RuntimeKind.ONNX),
    **dict.fromkeys(XGBOOST_PLATFORMS, RuntimeKind.XGBOOST),
}

# A runtime's platform when no artifact is known (a version that was never found).
DEFAULT_PLATFORMS: dict[RuntimeKind, str] = {
    RuntimeKind.ONNX: ONNX_PLATFORMS["model.onnx"],
    RuntimeKind.XGBOOST: XGBOOST_PLATFORMS["model.ubj"],
}

__all__ = [
    "ARTIFACTS",
    "DEFAULT_PLATFORMS",
    "PLATFORMS",
    "RUNTIMES",
    "DeferredFactory",
    "ExecutorTiming",
    "Executors",
    "Runtime",
    "RuntimeFactory",
    "RuntimeKind",
    "SignatureMismatch",
]
