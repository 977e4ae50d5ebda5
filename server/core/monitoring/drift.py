"""Data and prediction drift of live rows against a version's reference profile.

``DriftMonitor`` is pure and synchronous: the serving path feeds it from the
monitoring worker, the offline scorer feeds it scored chunks directly
(``server.batch.drift_file``), and both read the same JSON report. A column's
status needs both an effect size (PSI, optionally the JS distance) over its
threshold and a chi-squared homogeneity p-value under ``p_value``: large
windows make any shift significant, small windows make PSI noisy, and
requiring both avoids each failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from server.config import DriftSettings
from server.core.monitoring.divergence import Comparison, compare
from server.core.monitoring.reference import NumericProfile, Profile, ReferenceProfile
from server.core.monitoring.window import (
    MISSING,
    NONFINITE,
    OUT_OF_RANGE,
    ProfileWindow,
    Totals,
    WindowSpec,
)
from server.core.signature import Datatype, Signature, TensorSpec


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    ALERT = "alert"
    INSUFFICIENT = "insufficient_data"
    NO_REFERENCE = "no_reference"


# Gauge values: -1 means "no verdict" (too little data or nothing to compare with).
STATUS_CODES = {
    Status.OK: 0,
    Status.WARN: 1,
    Status.ALERT: 2,
    Status.INSUFFICIENT: -1,
    Status.NO_REFERENCE: -1,
}
_SEVERITY = (Status.OK, Status.WARN, Status.ALERT)


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe verdict; without any verdict, why not (too little data wins)."""
    seen = set(statuses)
    for status in reversed(_SEVERITY):
        if status in seen:
            return status
    return Status.INSUFFICIENT if Status.INSUFFICIENT in seen else Status.NO_REFERENCE


def judge(c: Comparison, settings: DriftSettings) -> Status:
    if c.p_value >= settings.p_value:
        return Status.OK
    if c.psi >= settings.psi_alert or (settings.js_alert is not None and c.js >= settings.js_alert):
        return Status.ALERT
    if c.psi >= settings.psi_warn or (settings.js_warn is not None and c.js >= settings.js_warn):
        return Status.WARN
    return Status.OK


@dataclass(frozen=True, slots=True)
class Column:
    """Where a profiled column lives: a tensor and, for 2-D tensors, a column index."""

    name: str
    tensor: str
    index: int | None


class Extractor:
    """Gathers columns from a dict of tensors into one ``rows x columns`` float64 matrix."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for position, column in enumerate(self.columns):
            positions, indices = groups.setdefault(column.tensor, ([], []))
            positions.append(position)
            indices.append(0 if column.index is None else column.index)
        self._groups = {t: (np.array(p), np.array(i)) for t, (p, i) in groups.items()}
        # A tensor whose columns are all used, in order, at consecutive positions
        # (a feature matrix) is copied as a block instead of gathered.
        self._whole = {
            t: bool(np.array_equal(i, np.arange(len(i))) and np.array_equal(p, p[0] + i))
            for t, (p, i) in self._groups.items()
        }

    @property
    def tensors(self) -> frozenset[str]:
        """The tensors the columns come from."""
        return frozenset(self._groups)

    def matrix(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """None when a tensor is absent (an output the client did not ask for)."""
        columns = self.by_column(tensors)
        return None if columns is None else columns.T

    def by_column(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The transposed matrix (``columns x rows``, C order), built in one pass."""
        if not self.columns or any(name not in tensors for name in self._groups):
            return None
        rows = len(tensors[next(iter(self._groups))])
        out = np.empty((len(self.columns), rows), dtype=np.float64)
        for name, (positions, indices) in self._groups.items():
            array = tensors[name].reshape(rows, -1).T
            if self._whole[name] and len(array) == len(indices):
                out[positions[0] : positions[-1] + 1] = array
            else:
                out[positions] = array[indices]
        return out


def locate(
    specs: Sequence[TensorSpec], profiles: Mapping[str, Profile], by_output: bool
) -> tuple[list[tuple[str, Profile]], list[Column], list[str]]:
    """Match reference columns to tensors: feature names for inputs, output names for outputs.

    Returns the located profiles, their columns, and the names left unmatched.
    """
    where: dict[str, tuple[str, int | None]] = {}
    for spec in specs:
        if spec.datatype is Datatype.BYTES or len(spec.shape) > 2:
            continue
        if spec.feature_names and not by_output:
            for position, feature in enumerate(spec.feature_names):
                where[feature] = (spec.name, position)
        elif len(spec.shape) == 1 or spec.shape[-1] in (1, -1) or by_output:
            where[spec.name] = (spec.name, None)
    located: list[tuple[str, Profile]] = []
    columns: list[Column] = []
    missing: list[str] = []
    for name, profile in profiles.items():
        if name not in where:
            missing.append(name)
            continue
        tensor, index = where[name]
        # For outputs the profile says which column of a 2-D output holds the score.
        columns.append(Column(name, tensor, profile.column if by_output else index))
        located.append((name, profile))
    return located, columns, missing


class DriftMonitor:
    """Live feature and prediction distributions of one version, against its reference."""

    def __init__(
        self,
        reference: ReferenceProfile,
        signature: Signature,
        settings: DriftSettings,
        spec: WindowSpec | None = None,
    ) -> None:
        self.reference = reference
        self.settings = settings
        spec = spec or WindowSpec(settings.window_rows, settings.window_s, settings.windows)
        features, columns, unmatched = locate(signature.inputs, reference.features, False)
        outputs, out_columns, out_unmatched = locate(signature.outputs, reference.predictions, True)
        self.features = ProfileWindow(features, spec)
        self.predictions = ProfileWindow(outputs, spec)
        self._inputs = Extractor(columns)
        self._outputs = Extractor(out_columns)
        self.unmatched = unmatched + out_unmatched

    @property
    def input_names(self) -> frozenset[str]:
        """The input tensors data drift reads."""
        return self._inputs.tensors

    @property
    def output_names(self) -> frozenset[str]:
        """The output tensors prediction drift reads."""
        return self._outputs.tensors

    def update(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], now: float
    ) -> None:
        """Count a block of rows; outputs missing a profiled tensor count for features only."""
        features = self._inputs.by_column(inputs)
        if features is not None:
            self.features.update_columns(features, now)
        predictions = self._outputs.by_column(outputs)
        if predictions is not None:
            self.predictions.update_columns(predictions, now)

    def report(self, now: float) -> dict[str, Any]:
        """The JSON drift report: window, data drift (with data quality), prediction drift."""
        spec = self.features.spec
        data = _section(self.features, now, self.settings, quality=True)
        prediction = _section(self.predictions, now, self.settings, quality=False)
        return {
            "profile_sha256": self.reference.sha256,
            "reference_rows": self.reference.rows,
            "window": {
                "rows": self.features.totals(now).rows,
                "rows_total": self.features.rows_seen,
                "sub_windows": spec.count,
                "sub_window_rows": spec.rows,
                "sub_window_s": spec.seconds if math.isfinite(spec.seconds) else None,
            },
            "thresholds": {
                "psi_warn": self.settings.psi_warn,
                "psi_alert": self.settings.psi_alert,
                "js_warn": self.settings.js_warn,
                "js_alert": self.settings.js_alert,
                "p_value": self.settings.p_value,
                "min_rows": self.settings.min_rows,
            },
            "data_drift": data,
            "prediction_drift": prediction,
            "unprofiled": self.unmatched,
        }


def _section(
    window: ProfileWindow, now: float, settings: DriftSettings, quality: bool
) -> dict[str, Any]:
    totals = window.totals(now)
    columns = {
        name: _column(window, i, totals, settings, quality) for i, name in enumerate(window.names)
    }
    statuses = [Status(c["status"]) for c in columns.values()]
    enough = totals.rows >= settings.min_rows or not columns
    status = worst(statuses) if enough else Status.INSUFFICIENT
    drifted = [name for name, c in columns.items() if c["status"] == Status.ALERT]
    return {
        "status": status.value,
        "rows": totals.rows,
        "drifted": drifted,
        "share": len(drifted) / len(columns) if columns else 0.0,
        "columns": columns,
    }


def _column(
    window: ProfileWindow, i: int, totals: Totals, settings: DriftSettings, quality: bool
) -> dict[str, Any]:
    profile = window.profiles[i]
    counts = totals.counts[window.offsets[i] : window.offsets[i + 1]]
    seen = int(counts.sum())
    reference = (
        profile.fractions
        if isinstance(profile, NumericProfile)
        else np.append(profile.fractions, 0.0)
    )
    entry: dict[str, Any] = {
        "kind": "numeric" if isinstance(profile, NumericProfile) else "categorical",
        "rows": seen,
    }
    if seen:
        c = compare(counts, reference, profile.count)
        status = judge(c, settings) if seen >= settings.min_rows else Status.INSUFFICIENT
        entry.update(psi=c.psi, js=c.js, chi2=c.chi2, p_value=c.p_value)
    else:
        status = Status.INSUFFICIENT
        entry.update(psi=None, js=None, chi2=None, p_value=None)
    entry["status"] = status.value
    if isinstance(profile, NumericProfile):
        entry["mean"] = float(totals.sums[i] / seen) if seen else None
        entry["reference_mean"] = _finite(profile.mean)
    if quality:
        rows = max(totals.rows, 1)
        extras = totals.extras[i]
        entry["missing_ratio"] = int(extras[MISSING]) / rows if totals.rows else None
        entry["nonfinite_ratio"] = int(extras[NONFINITE]) / rows if totals.rows else None
        entry["out_of_range_ratio"] = int(extras[OUT_OF_RANGE]) / seen if seen else None
        entry["reference_missing_ratio"] = profile.missing_rate
    return entry


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
