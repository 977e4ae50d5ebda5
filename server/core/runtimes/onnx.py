"""ONNX Runtime runtime: one InferenceSession per model version on the CPU provider."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.core.runtimes import ONNX_PLATFORMS as PLATFORMS
from server.core.runtimes.base import Executors, SignatureMismatch
from server.core.signature import Datatype, Signature, TensorSpec
from server.errors import RuntimeFailure

ONNX_TYPES: dict[str, Datatype] = {
    "tensor(bool)": Datatype.BOOL,
    "tensor(uint8)": Datatype.UINT8,
    "tensor(uint16)": Datatype.UINT16,
    "tensor(uint32)": Datatype.UINT32,
    "tensor(uint64)": Datatype.UINT64,
    "tensor(int8)": Datatype.INT8,
    "tensor(int16)": Datatype.INT16,
    "tensor(int32)": Datatype.INT32,
    "tensor(int64)": Datatype.INT64,
    "tensor(float16)": Datatype.FP16,
    "tensor(float)": Datatype.FP32,
    "tensor(double)": Datatype.FP64,
    "tensor(string)": Datatype.BYTES,
}

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_OPTIONS = {"intra_op_threads", "inter_op_threads", "graph_optimization"}


class OnnxRuntime:
    """Wraps an ``onnxruntime.InferenceSession``; ``run`` is thread-safe."""

    platform = PLATFORMS["model.onnx"]
    # Already a graph for ONNX Runtime (trees included): nothing to compile, one executor.
    executors = Executors(("onnxruntime",))

    def __init__(
        self,
        artifact: Path,
        signature: Signature,
        options: Mapping[str, Any],
        *,
        isolated: bool = False,  # nothing to isolate: an ONNX session loads in C++
    ) -> None:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise SignatureMismatch(f"unknown onnx runtime option(s): {sorted(unknown)}")
        level = options.get("graph_optimization", "all")
        if level not in GRAPH_OPTIMIZATION:
            raise SignatureMismatch(
                f"runtime_options.graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}"
            )
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = int(options.get("intra_op_threads", 1))
        session_options.inter_op_num_threads = int(options.get("inter_op_threads", 1))
        session_options.graph_optimization_level = GRAPH_OPTIMIZATION[level]
        session_options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(artifact), sess_options=session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise SignatureMismatch(f"cannot load ONNX model {artifact.name}: {exc}") from exc
        self._check(signature)
        self._output_names = [spec.name for spec in signature.outputs]

    def _check(self, signature: Signature) -> None:
        actual_inputs = {arg.name: arg for arg in self._session.get_inputs()}
        actual_outputs = {arg.name: arg for arg in self._session.get_outputs()}
        for kind, specs, actual in (
            ("input", signature.inputs, actual_inputs),
            ("output", signature.outputs, actual_outputs),
        ):
            declared = {spec.name for spec in specs}
            if kind == "input" and declared != set(actual):
                raise SignatureMismatch(
                    f"model.yaml declares inputs {sorted(declared)} "
                    f"but the ONNX graph has {sorted(actual)}"
                )
            for spec in specs:
                if spec.name not in actual:
                    raise SignatureMismatch(
                        f"model.yaml declares {kind} '{spec.name}' but the ONNX graph has "
                        f"{sorted(actual)}"
                    )
                _check_arg(kind, spec, actual[spec.name])

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on a batch."""
        try:
            results = self._session.run(self._output_names, dict(inputs))
        except Exception as exc:
            raise RuntimeFailure(f"ONNX Runtime run failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session so ONNX Runtime frees its arena."""
        del self._session


def _check_arg(kind: str, spec: TensorSpec, arg: Any) -> None:
    datatype = ONNX_TYPES.get(arg.type)
    if datatype is not spec.datatype:
        raise SignatureMismatch(
            f"{kind} '{spec.name}' is {spec.datatype.value} in model.yaml "
            f"but {arg.type} in the ONNX graph"
        )
    shape = list(arg.shape)
    if len(shape) != len(spec.shape):
        raise SignatureMismatch(
            f"{kind} '{spec.name}' has shape {list(spec.shape)} in model.yaml "
            f"but rank {len(shape)} ({shape}) in the ONNX graph"
        )
    for declared, actual in zip(spec.shape, shape, strict=True):
        if isinstance(actual, int) and declared not in (-1, actual):
            raise SignatureMismatch(
                f"{kind} '{spec.name}' has shape {list(spec.shape)} in model.yaml "
                f"but {shape} in the ONNX graph"
            )
