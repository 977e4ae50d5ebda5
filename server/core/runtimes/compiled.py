"""Compiled trees: an XGBoost booster converted to an ONNX TreeEnsemble, run by ONNX Runtime.

XGBoost spends ~70-130 µs of fixed set-up per predict call; for one row the
tree walk itself is a few microseconds. ONNX Runtime's TreeEnsemble kernel has
almost no per-call cost (7 µs for one row of the 300-tree fraud model), but it
is 2-3x slower than XGBoost per row from a few dozen rows on. The hybrid
runtime (``hybrid.py``) uses this for the small batches only.

onnxmltools is imported here, on first use, so a server that pins
``executor: xgboost`` never pays for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort
import xgboost as xgb

from server.core.runtimes.base import CompileError
from server.errors import RuntimeFailure

# onnxmltools emits TreeEnsemble from ai.onnx.ml; it supports target opsets up to 15.
TARGET_OPSET = 15

# Objective -> the graph output that answers like XGBoost's predict, and the column of
# it to keep (None: all). Any other objective has no compiled form here.
OUTPUTS: dict[str, tuple[str, int | None]] = {
    "binary:logistic": ("probabilities", 1),
    "multi:softprob": ("probabilities", None),
    "reg:squarederror": ("variable", 0),
    "reg:absoluteerror": ("variable", 0),
}


class CompiledTrees:
    """An ONNX Runtime session over the booster's trees, answering in XGBoost's shapes.

    ``predict`` returns what ``XGBoostRuntime.predict`` returns for the same
    rows: probabilities of the positive class as ``[n]`` for a binary
    classifier, ``[n, k]`` for ``multi:softprob``, the prediction as ``[n]``
    for a regressor; in ``dtype``.
    """

    def __init__(
        self, model: bytes, objective: str, input_name: str, output_name: str, dtype: np.dtype
    ) -> None:
        options = ort.SessionOptions()
        # One thread: each call is microseconds; the server's thread pool gives parallelism.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise CompileError(f"ONNX Runtime refused the converted trees: {exc}") from exc
        self._graph_input = self._session.get_inputs()[0].name
        fetch, self._column = OUTPUTS[objective]
        self._fetch = [fetch]
        self._input = input_name
        self._output = output_name
        self._dtype = dtype
        self.model = model
        self.objective = objective

    @classmethod
    def convert(
        cls, booster: xgb.Booster, input_name: str, output_name: str, dtype: np.dtype
    ) -> CompiledTrees:
        """Convert ``booster`` (left untouched); CompileError says why it cannot be."""
        objective = _objective(booster)
        if objective not in OUTPUTS:
            raise CompileError(
                f"objective {objective} has no compiled form (supported: {', '.join(OUTPUTS)})"
            )
        return cls(_to_onnx(booster), objective, input_name, output_name, dtype)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch; the TreeEnsemble kernel reads float32 (as XGBoost does inside)."""
        rows = inputs[self._input]
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        try:
            (result,) = self._session.run(self._fetch, {self._graph_input: rows})
        except Exception as exc:
            raise RuntimeFailure(f"compiled trees failed: {exc}") from exc
        if self._column is not None:
            result = result[:, self._column]
        # Copy into a fresh C-ordered array: a column view would keep the session's
        # whole output alive, and callers slice the batch back per request.
        return {self._output: np.ascontiguousarray(result, dtype=self._dtype)}

    def thresholds(self) -> dict[int, np.ndarray]:
        """Every split value per feature index, read back from the converted graph."""
        import onnx

        graph = onnx.load_from_string(self.model).graph
        node = next(n for n in graph.node if n.op_type.startswith("TreeEnsemble"))
        attributes = {a.name: a for a in node.attribute}
        features = np.asarray(attributes["nodes_featureids"].ints, dtype=np.int64)
        values = np.asarray(attributes["nodes_values"].floats, dtype=np.float32)
        modes = [m.decode() for m in attributes["nodes_modes"].strings]
        branch = np.asarray([m != "LEAF" for m in modes], dtype=bool)
        found: dict[int, np.ndarray] = {}
        for feature in np.unique(features[branch]):
            found[int(feature)] = np.unique(values[branch & (features == feature)])
        return found

    def close(self) -> None:
        del self._session


def _objective(booster: xgb.Booster) -> str:
    try:
        config = json.loads(booster.save_config())
        return str(config["learner"]["objective"]["name"])
    except (KeyError, ValueError, xgb.core.XGBoostError) as exc:
        raise CompileError(f"cannot read the booster's objective: {exc}") from exc


def _to_onnx(booster: xgb.Booster) -> bytes:
    try:
        from onnxmltools.convert import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as exc:
        raise CompileError(f"onnxmltools is not installed ({exc})") from exc
    copy = booster.copy()
    # onnxmltools reads features as f0..fN and fails on any other names.
    copy.feature_names = None
    copy.feature_types = None
    features = booster.num_features()
    try:
        onx = convert_xgboost(
            copy,
            initial_types=[("rows", FloatTensorType([None, features]))],
            target_opset=TARGET_OPSET,
        )
    except Exception as exc:  # the converter raises whatever it meets
        raise CompileError(f"onnxmltools cannot convert this booster: {exc}") from exc
    model: bytes = onx.SerializeToString()
    return model
