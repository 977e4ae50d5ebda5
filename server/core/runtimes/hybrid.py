"""The XGBoost runtime as served: XGBoost, compiled trees, or both chosen per batch size.

``runtime_options.executor``:

- ``auto`` (default): convert the booster to compiled trees at load, check
  that both executors agree on the version's rows within
  ``parity_tolerance`` (default 1e-5), time both at a few batch sizes, and
  send each batch to the faster one. When the conversion or the parity check
  fails, the version serves with XGBoost alone and says why.
- ``xgboost``: XGBoost only, nothing converted (bit-exact with any other
  XGBoost 3 on the same rows, whatever the batch size).
- ``compiled``: the compiled trees for every batch; a version whose compiled
  form fails the parity check does not load.

With ``auto`` a row scored alone and the same row inside a large batch run on
different executors, so they can differ in the last float bits (within the
tolerance).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.core.runtimes.base import (
    CompileError,
    Executors,
    ExecutorTiming,
    Runtime,
    SignatureMismatch,
)
from server.core.runtimes.parity import largest_difference, parity_rows
from server.core.signature import Signature

if TYPE_CHECKING:
    # Imported when a version loads: the constants above are read without XGBoost, and
    # ``executor: xgboost`` never imports ONNX Runtime or onnxmltools.
    from server.core.runtimes.compiled import CompiledTrees
    from server.core.runtimes.xgboost import XGBoostRuntime

log = logging.getLogger("sluice.runtime.hybrid")

DEFAULT_TOLERANCE = 1e-5
# Batch sizes timed at load, smallest first; timing stops once XGBoost has won twice in
# a row (its per-row cost is lower, so larger batches only widen its lead).
TIMED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Handing a call to the inference pool and back cost 23 µs with both on one core and
# 60-90 µs across two (uvloop, fraud v2). A compiled call at or under this budget (7 µs
# for one row of fraud v2) runs on the event loop instead, stalling it no longer.
INLINE_BUDGET_US = 20.0
_ROUNDS = 31  # calls per executor and size, alternating: the median shrugs off a busy CPU


class ExecutorMode(StrEnum):
    AUTO = "auto"
    XGBOOST = "xgboost"
    COMPILED = "compiled"


class HybridRuntime:
    """Sends a batch of fewer than ``switch_rows`` rows to the compiled trees, others to XGBoost."""

    def __init__(
        self, xgboost: XGBoostRuntime, compiled: CompiledTrees, executors: Executors
    ) -> None:
        self._xgboost = xgboost
        self._compiled = compiled
        self._input = xgboost.input_name
        self._switch = executors.switch_rows if executors.switch_rows is not None else sys.maxsize
        self.platform = xgboost.platform
        self.executors = executors

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch on the executor measured faster for its size."""
        if inputs[self._input].shape[0] < self._switch:
            return self._compiled.predict(inputs)
        return self._xgboost.predict(inputs)

    def close(self) -> None:
        self._compiled.close()
        self._xgboost.close()


def load_xgboost(
    artifact: Path, signature: Signature, options: Mapping[str, Any], *, isolated: bool = False
) -> Runtime:
    """The XGBoost runtime factory: XGBoost, plus compiled trees when they pay and agree.

    ``isolated``: convert, check and time the compiled trees in a child process
    (``server.core.runtimes.isolated``); this process only opens the result.
    """
    from server.core.runtimes.xgboost import XGBoostRuntime

    mode, tolerance, rest = _executor_options(options)
    xgboost = XGBoostRuntime(artifact, signature, rest)
    where = f"{artifact.parent.parent.name} v{artifact.parent.name}"
    if mode is ExecutorMode.XGBOOST:
        xgboost.executors = Executors(("xgboost",), mode=mode.value)
        return xgboost
    try:
        if isolated:
            from server.core.runtimes.isolated import prepare

            compiled, parity, checked, timings = prepare(
                xgboost, artifact, signature, rest, tolerance
            )
        else:
            compiled, parity, rows = compile_and_check(xgboost, artifact, signature, tolerance)
            timings = measure(xgboost, compiled, rows, xgboost.input_name)
            checked = len(rows)
    except CompileError as exc:
        if mode is ExecutorMode.COMPILED:
            xgboost.close()
            raise SignatureMismatch(f"executor compiled: {exc}") from exc
        log.warning("%s: serving with XGBoost alone: %s", where, exc)
        xgboost.executors = Executors(
            ("xgboost",), mode=mode.value, tolerance=tolerance, note=str(exc)
        )
        return xgboost
    if mode is ExecutorMode.COMPILED:
        executors = Executors(
            ("compiled",), mode.value, None, parity, tolerance, "", timings, inline_rows(timings)
        )
        return HybridRuntime(xgboost, compiled, executors)
    switch = switch_rows(timings)
    if switch <= 1:
        compiled.close()
        note = "the compiled trees were slower than XGBoost at every batch size timed"
        log.info("%s: serving with XGBoost alone: %s", where, note)
        xgboost.executors = Executors(
            ("xgboost",), mode.value, None, parity, tolerance, note, timings
        )
        return xgboost
    inline = min(inline_rows(timings), switch - 1)
    executors = Executors(
        ("compiled", "xgboost"), mode.value, switch, parity, tolerance, "", timings, inline
    )
    log.info(
        "%s: executors %s (parity %.2g on %d rows, tolerance %g; up to %d rows on the loop)",
        where,
        executors.summary(),
        parity,
        checked,
        tolerance,
        inline,
    )
    return HybridRuntime(xgboost, compiled, executors)


def _executor_options(options: Mapping[str, Any]) -> tuple[ExecutorMode, float, dict[str, Any]]:
    rest = dict(options)
    raw_mode = rest.pop("executor", ExecutorMode.AUTO.value)
    try:
        mode = ExecutorMode(raw_mode)
    except ValueError:
        raise SignatureMismatch(
            f"runtime_options.executor must be one of {[m.value for m in ExecutorMode]}, "
            f"got {raw_mode!r}"
        ) from None
    raw_tolerance = rest.pop("parity_tolerance", DEFAULT_TOLERANCE)
    if isinstance(raw_tolerance, bool) or not isinstance(raw_tolerance, int | float):
        raise SignatureMismatch(
            f"runtime_options.parity_tolerance must be a number, got {raw_tolerance!r}"
        )
    if not raw_tolerance >= 0:
        raise SignatureMismatch(
            f"runtime_options.parity_tolerance must be >= 0, got {raw_tolerance!r}"
        )
    return mode, float(raw_tolerance), rest


def compile_and_check(
    xgboost: XGBoostRuntime, artifact: Path, signature: Signature, tolerance: float
) -> tuple[CompiledTrees, float, np.ndarray]:
    if xgboost.margin:
        raise CompileError(
            "the compiled trees answer probabilities, not runtime_options.output margin"
        )
    from server.core.runtimes.compiled import CompiledTrees

    compiled = CompiledTrees.convert(
        xgboost.booster, xgboost.input_name, xgboost.output_name, xgboost.dtype
    )
    try:
        rows = parity_rows(artifact.parent, signature.inputs[0], compiled.thresholds())
        name = xgboost.input_name
        parity = largest_difference(
            xgboost.predict({name: rows})[xgboost.output_name],
            compiled.predict({name: rows})[xgboost.output_name],
        )
        if not parity <= tolerance:
            raise CompileError(
                f"parity check failed: the compiled trees differ from XGBoost by up to "
                f"{parity:.3g} on {len(rows)} rows (runtime_options.parity_tolerance "
                f"{tolerance:g})"
            )
    except CompileError:
        compiled.close()
        raise
    return compiled, parity, rows


def measure(
    xgboost: XGBoostRuntime, compiled: CompiledTrees, rows: np.ndarray, input_name: str
) -> tuple[ExecutorTiming, ...]:
    """Median µs per call of each executor at each size in TIMED_ROWS, calls alternating."""
    timings: list[ExecutorTiming] = []
    xgboost_wins = 0
    for size in TIMED_ROWS:
        batch = {input_name: np.ascontiguousarray(np.resize(rows, (size, rows.shape[1])))}
        xgboost.predict(batch)  # warm both: first calls allocate per-thread scratch space
        compiled.predict(batch)
        samples: dict[str, list[int]] = {"xgboost": [], "compiled": []}
        for _ in range(_ROUNDS if size <= 256 else _ROUNDS // 3):
            for label, predict in (("xgboost", xgboost.predict), ("compiled", compiled.predict)):
                started = time.perf_counter_ns()
                predict(batch)
                samples[label].append(time.perf_counter_ns() - started)
        medians = {label: float(np.median(ns)) / 1000 for label, ns in samples.items()}
        timings += [ExecutorTiming(label, size, us) for label, us in medians.items()]
        xgboost_wins = xgboost_wins + 1 if medians["xgboost"] <= medians["compiled"] else 0
        if xgboost_wins == 2:
            break
    return tuple(timings)


def inline_rows(timings: tuple[ExecutorTiming, ...]) -> int:
    """The largest batch whose compiled call costs at most INLINE_BUDGET_US (0: none)."""
    cheap = [t.rows for t in timings if t.executor == "compiled" and t.micros <= INLINE_BUDGET_US]
    return max(cheap, default=0)


def switch_rows(timings: tuple[ExecutorTiming, ...]) -> int:
    """The smallest batch that should run on XGBoost, from the timings.

    Below the first size XGBoost won at, the compiled trees were faster; between
    that size and the one before it, the crossover is interpolated (both costs grow
    about linearly with rows). Compiled faster at every size: twice the largest.
    """
    by_rows: dict[int, dict[str, float]] = {}
    for t in timings:
        by_rows.setdefault(t.rows, {})[t.executor] = t.micros
    sizes = sorted(by_rows)
    previous: int | None = None
    for size in sizes:
        cost = by_rows[size]
        if cost["xgboost"] <= cost["compiled"]:
            if previous is None:
                return 1 if size == 1 else size
            return _crossover(previous, by_rows[previous], size, cost)
        previous = size
    return 2 * sizes[-1] if sizes else 1


def _crossover(lo: int, at_lo: dict[str, float], hi: int, at_hi: dict[str, float]) -> int:
    slope = {k: (at_hi[k] - at_lo[k]) / (hi - lo) for k in ("xgboost", "compiled")}
    gap = at_lo["xgboost"] - at_lo["compiled"]  # > 0: compiled faster at lo
    closing = slope["compiled"] - slope["xgboost"]
    if closing <= 0:
        return hi
    return min(hi, max(lo + 1, math.ceil(lo + gap / closing)))
