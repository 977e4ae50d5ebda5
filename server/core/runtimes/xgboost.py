"""XGBoost runtime: a Booster from ``.ubj`` or ``.json``, predicted in place from dense rows."""

from __future__ import annotations

import ctypes
import json
import logging
import re
import threading
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from server.core.runtimes import XGBOOST_PLATFORMS as PLATFORMS
from server.core.runtimes.base import Executors, SignatureMismatch
from server.core.signature import Datatype, Signature
from server.errors import RuntimeFailure

log = logging.getLogger("sluice.runtime.xgboost")


class XGBoostOutput(StrEnum):
    PROBABILITY = "probability"
    MARGIN = "margin"


class XGBoostRuntime:
    """One Booster per model version; ``inplace_predict`` is thread-safe."""

    platform = PLATFORMS["model.ubj"]
    executors = Executors(("xgboost",))

    def __init__(self, artifact: Path, signature: Signature, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"output", "threads"}
        if unknown:
            raise SignatureMismatch(f"unknown xgboost runtime option(s): {sorted(unknown)}")
        try:
            self._output = XGBoostOutput(options.get("output", "probability"))
        except ValueError:
            raise SignatureMismatch(
                f"runtime_options.output must be 'probability' or 'margin', "
                f"got {options.get('output')!r}"
            ) from None
        try:
            self._booster = xgb.Booster(model_file=str(artifact))
            self._booster.set_param({"nthread": int(options.get("threads", 1))})
        except xgb.core.XGBoostError as exc:
            raise SignatureMismatch(
                f"cannot load XGBoost model {artifact.name}: {xgboost_message(exc)}"
            ) from exc
        self.platform = PLATFORMS.get(artifact.name, self.platform)
        self._check(signature)
        self.input_name = signature.inputs[0].name
        self.output_name = signature.outputs[0].name
        fp64 = signature.outputs[0].datatype is Datatype.FP64
        self.dtype = np.dtype(np.float64 if fp64 else np.float32)
        self._dense = _DensePredictor.create(
            self._booster, margin=self._output is XGBoostOutput.MARGIN
        )

    def _check(self, signature: Signature) -> None:
        if len(signature.inputs) != 1 or len(signature.outputs) != 1:
            raise SignatureMismatch("an XGBoost model has exactly one input and one output tensor")
        spec = signature.inputs[0]
        if len(spec.shape) != 2:
            raise SignatureMismatch(
                f"input '{spec.name}' must be 2-D [rows, features], got {list(spec.shape)}"
            )
        n_features = self._booster.num_features()
        if spec.shape[1] != n_features:
            raise SignatureMismatch(
                f"input '{spec.name}' declares {spec.shape[1]} features "
                f"but the booster was trained on {n_features}"
            )
        names = self._booster.feature_names
        if spec.feature_names and names and list(names) != list(spec.feature_names):
            first = next(
                i for i, (a, b) in enumerate(zip(names, spec.feature_names, strict=False)) if a != b
            )
            raise SignatureMismatch(
                f"feature {first} is '{spec.feature_names[first]}' in model.yaml "
                f"but '{names[first]}' in the booster"
            )
        if signature.outputs[0].datatype not in (Datatype.FP32, Datatype.FP64):
            raise SignatureMismatch("an XGBoost output must be FP32 or FP64")

    @property
    def booster(self) -> xgb.Booster:
        return self._booster

    @property
    def margin(self) -> bool:
        return self._output is XGBoostOutput.MARGIN

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch of rows."""
        rows = inputs[self.input_name]
        predict_type = "margin" if self._output is XGBoostOutput.MARGIN else "value"
        try:
            if self._dense is not None and _DensePredictor.accepts(rows):
                result = self._dense.predict(rows)
            else:
                result = self._booster.inplace_predict(rows, predict_type=predict_type)
        except xgb.core.XGBoostError as exc:
            raise RuntimeFailure(f"XGBoost predict failed: {exc}") from exc
        return {self.output_name: np.asarray(result, dtype=self.dtype)}

    def close(self) -> None:
        """Boosters free their memory when collected; drop our reference."""
        if self._dense is not None:
            self._dense.close()
            self._dense = None
        del self._booster


_bst_ulong = ctypes.c_uint64


class _DensePredictor:
    """``inplace_predict`` on a float matrix through XGBoost's C API, one proxy per thread.

    Without a proxy DMatrix, ``XGBoosterPredictFromDense`` builds one per call,
    and its Context reads the cgroup CPU quota files every time (strace: 2 opens,
    3 stats, 2 reads per predict). On our 2-core VM that was 146 of the 307 µs a
    1-row predict took through ``Booster.inplace_predict``. A proxy per inference
    thread, reused, skips it; same C function, same results (tested bit for bit).
    """

    def __init__(self, lib: Any, booster: xgb.Booster, margin: bool) -> None:
        self._lib = lib
        self._booster = booster
        self._config = json.dumps(
            {
                "type": 1 if margin else 0,
                "training": False,
                "iteration_begin": 0,
                "iteration_end": 0,
                "missing": float("nan"),
                "strict_shape": False,
                "cache_id": 0,
            }
        ).encode()
        self._local = threading.local()
        self._proxies: list[ctypes.c_void_p] = []
        self._lock = threading.Lock()

    @classmethod
    def create(cls, booster: xgb.Booster, margin: bool) -> _DensePredictor | None:
        """None when this xgboost lacks the C functions; callers use the public method."""
        lib = getattr(xgb.core, "_LIB", None)
        names = ("XGProxyDMatrixCreate", "XGBoosterPredictFromDense", "XGDMatrixFree")
        if lib is None or not all(hasattr(lib, name) for name in names):
            log.warning(
                "xgboost %s: no dense C API; using Booster.inplace_predict", xgb.__version__
            )
            return None
        return cls(lib, booster, margin)

    @staticmethod
    def accepts(rows: np.ndarray) -> bool:
        return (
            rows.ndim == 2
            and rows.dtype in (np.float32, np.float64)
            and rows.flags.c_contiguous
            and rows.dtype.byteorder in ("=", "<")
        )

    def _proxy(self) -> ctypes.c_void_p:
        proxy: ctypes.c_void_p | None = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = ctypes.c_void_p()
            self._check(self._lib.XGProxyDMatrixCreate(ctypes.byref(proxy)))
            with self._lock:
                self._proxies.append(proxy)
            self._local.proxy = proxy
        return proxy

    def predict(self, rows: np.ndarray) -> np.ndarray:
        typestr = "<f4" if rows.dtype == np.float32 else "<f8"
        interface = (
            f'{{"data":[{rows.ctypes.data},true],"shape":[{rows.shape[0]},{rows.shape[1]}],'
            f'"strides":null,"typestr":"{typestr}","version":3}}'
        ).encode()
        shape = ctypes.POINTER(_bst_ulong)()
        dims = _bst_ulong()
        result = ctypes.POINTER(ctypes.c_float)()
        self._check(
            self._lib.XGBoosterPredictFromDense(
                self._booster.handle,
                ctypes.c_char_p(interface),
                ctypes.c_char_p(self._config),
                self._proxy(),
                ctypes.byref(shape),
                ctypes.byref(dims),
                ctypes.byref(result),
            )
        )
        out_shape = tuple(shape[i] for i in range(dims.value))
        out = np.empty(out_shape, dtype=np.float32)
        # The buffer belongs to the booster's per-thread scratch space: copy it now. A
        # memmove, not np.ctypeslib.as_array: its ctypes.cast leaves a reference cycle
        # per call (two objects for the garbage collector per request).
        ctypes.memmove(out.ctypes.data, result, out.nbytes)
        return out

    def _check(self, code: int) -> None:
        if code != 0:
            raise xgb.core.XGBoostError(self._lib.XGBGetLastError().decode())

    def close(self) -> None:
        with self._lock:
            for proxy in self._proxies:
                self._lib.XGDMatrixFree(proxy)
            self._proxies.clear()


def xgboost_message(exc: Exception) -> str:
    """XGBoost's own reason, without its time stamp, source location and stack dump."""
    lines = str(exc).split("Stack trace:")[0].strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(exc).__name__
