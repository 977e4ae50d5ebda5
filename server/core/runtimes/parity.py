"""The rows two executors of one version must agree on, and how far apart they are.

Two sources, both deterministic:

- the version's ``holdout.parquet`` (rows the model never saw, written by the
  training script next to the artifact): what real traffic looks like;
- rows built from the trees' own split values, every feature set exactly at a
  threshold or one float step either side of it, so both sides of the
  comparisons the executors could disagree on are taken. When the input
  allows non-finite values, a tenth of those cells are NaN (XGBoost's missing
  value, whose default branch the converter must keep).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.core.signature import TensorSpec

HOLDOUT = "holdout.parquet"
MAX_HOLDOUT_ROWS = 5000
THRESHOLD_ROWS = 2000
_SEED = 20240613


def parity_rows(folder: Path, spec: TensorSpec, thresholds: dict[int, np.ndarray]) -> np.ndarray:
    """Holdout rows (when the version has them) then threshold rows, float32 [n, features]."""
    features = int(spec.shape[1])
    parts = [_threshold_rows(features, thresholds, nonfinite=spec.allow_nonfinite)]
    holdout = _holdout_rows(folder / HOLDOUT, spec)
    if holdout is not None:
        parts.insert(0, holdout)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def largest_difference(expected: np.ndarray, got: np.ndarray) -> float:
    """The largest absolute difference; infinite when shapes, dtypes or NaNs disagree."""
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return float("inf")
    a = expected.astype(np.float64)
    b = got.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return float("inf")
    both = ~nan_a
    if not both.any():
        return 0.0
    return float(np.max(np.abs(a[both] - b[both])))


def _holdout_rows(path: Path, spec: TensorSpec) -> np.ndarray | None:
    if not path.is_file() or not spec.feature_names:
        return None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(spec.feature_names))
    except (OSError, ValueError, KeyError):
        # pyarrow raises ArrowInvalid (a ValueError) for a column it does not find
        return None
    table = table.slice(0, MAX_HOLDOUT_ROWS)
    columns = [table.column(name).to_numpy().astype(np.float32) for name in spec.feature_names]
    rows = np.column_stack(columns)
    if not spec.allow_nonfinite:
        rows = rows[np.isfinite(rows).all(axis=1)]
    return rows


def _threshold_rows(
    features: int, thresholds: dict[int, np.ndarray], nonfinite: bool
) -> np.ndarray:
    rng = np.random.default_rng(_SEED)
    rows = np.zeros((THRESHOLD_ROWS, features), dtype=np.float32)
    for feature, values in thresholds.items():
        if feature >= features or values.size == 0:
            continue
        picked = values[rng.integers(0, values.size, THRESHOLD_ROWS)].astype(np.float32)
        step = rng.integers(-1, 2, THRESHOLD_ROWS)  # one float below, exactly at, one above
        below = np.nextafter(picked, np.float32(-np.inf))
        above = np.nextafter(picked, np.float32(np.inf))
        rows[:, feature] = np.where(step < 0, below, np.where(step > 0, above, picked))
    if nonfinite:
        rows[rng.random(rows.shape) < 0.1] = np.nan
    return rows
