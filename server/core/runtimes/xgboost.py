"""XGBoost runtime: a Booster from ``.ubj`` or ``.json``, predicted with ``inplace_predict``."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from server.core.runtimes.base import SignatureMismatch
from server.core.signature import Datatype, Signature
from server.errors import RuntimeFailure


class XGBoostOutput(StrEnum):
    PROBABILITY = "probability"
    MARGIN = "margin"


class XGBoostRuntime:
    """One Booster per model version; ``inplace_predict`` is thread-safe."""

    platform = "xgboost_ubj"

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
            raise SignatureMismatch(f"cannot load XGBoost model {artifact.name}: {exc}") from exc
        self.platform = "xgboost_json" if artifact.suffix == ".json" else "xgboost_ubj"
        self._check(signature)
        self._input = signature.inputs[0].name
        self._output_name = signature.outputs[0].name
        self._output_dtype = Datatype(signature.outputs[0].datatype)

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

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch of rows."""
        predict_type = "margin" if self._output is XGBoostOutput.MARGIN else "value"
        try:
            result = self._booster.inplace_predict(inputs[self._input], predict_type=predict_type)
        except xgb.core.XGBoostError as exc:
            raise RuntimeFailure(f"XGBoost predict failed: {exc}") from exc
        dtype = np.float64 if self._output_dtype is Datatype.FP64 else np.float32
        return {self._output_name: np.asarray(result, dtype=dtype)}

    def close(self) -> None:
        """Boosters free their memory when collected; drop our reference."""
        del self._booster
