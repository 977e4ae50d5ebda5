"""Live bin counts per column in bounded memory: a ring of sub-windows.

Each column keeps counts over the reference's own bins, so memory is fixed at
``sub-windows x total bins`` integers whatever the traffic. A sub-window closes
after ``rows`` rows or ``seconds`` seconds; the live window is the sum of the
ring, and sub-windows older than ``count x seconds`` drop out of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.core.monitoring.reference import CategoricalProfile, NumericProfile, Profile

MISSING, NONFINITE, OUT_OF_RANGE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class WindowSpec:
    rows: int
    seconds: float
    count: int


@dataclass(frozen=True, slots=True)
class Totals:
    """The live window summed over its sub-windows."""

    rows: int
    counts: np.ndarray  # per bin, all columns concatenated
    extras: np.ndarray  # (columns, 3): missing, non-finite, out of reference range
    sums: np.ndarray  # per column, sum of the finite values


class ProfileWindow:
    """Counts live values of a fixed list of columns against their reference bins."""

    def __init__(self, profiles: Sequence[tuple[str, Profile]], spec: WindowSpec) -> None:
        self.names = tuple(name for name, _ in profiles)
        self.profiles = tuple(profile for _, profile in profiles)
        self.spec = spec
        sizes = [p.bins for p in self.profiles]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        width, columns = int(self.offsets[-1]), len(self.profiles)
        self._counts = np.zeros((spec.count, width), dtype=np.int64)
        self._extras = np.zeros((spec.count, columns, 3), dtype=np.int64)
        self._sums = np.zeros((spec.count, columns), dtype=np.float64)
        self._rows = np.zeros(spec.count, dtype=np.int64)
        self._started = np.full(spec.count, -np.inf)
        self._current = 0
        self.rows_seen = 0
        # Numeric columns are binned together: bin = number of edges <= x, against a
        # (columns x edges) matrix padded with +inf; one comparison replaces a loop.
        numeric = [i for i, p in enumerate(self.profiles) if isinstance(p, NumericProfile)]
        self._numeric = np.array(numeric, dtype=np.int64)
        self._numeric_offsets = self.offsets[self._numeric]
        self._categorical = [i for i in range(columns) if i not in set(numeric)]
        edges = [self.profiles[i].edges for i in numeric]  # type: ignore[union-attr]
        width_edges = max((len(e) for e in edges), default=0)
        self._edges = np.full((len(numeric), width_edges), np.inf)
        for row, e in enumerate(edges):
            self._edges[row, : len(e)] = e
        self._low = np.array([self.profiles[i].min for i in numeric])  # type: ignore[union-attr]
        self._high = np.array([self.profiles[i].max for i in numeric])  # type: ignore[union-attr]

    def update(self, matrix: np.ndarray, now: float) -> None:
        """Add rows (``rows x columns``, float64, NaN = missing); splits at window edges."""
        self.update_columns(np.ascontiguousarray(matrix.T), now)

    def update_columns(self, columns: np.ndarray, now: float) -> None:
        """Add rows given column by column (``columns x rows``, float64, C order)."""
        start, rows = 0, columns.shape[1]
        while start < rows:
            self._rotate(now)
            room = int(self.spec.rows - self._rows[self._current])
            part = columns[:, start : start + room]
            self._count(part)
            start += part.shape[1]

    def _rotate(self, now: float) -> None:
        slot = self._current
        rows = self._rows[slot]
        if rows == 0:
            self._started[slot] = now
            return
        if rows < self.spec.rows and now - self._started[slot] < self.spec.seconds:
            return
        slot = self._current = (slot + 1) % self.spec.count
        self._counts[slot] = 0
        self._extras[slot] = 0
        self._sums[slot] = 0
        self._rows[slot] = 0
        self._started[slot] = now

    def _count(self, columns: np.ndarray) -> None:
        # Column by column: numpy is quick along long rows and slow along a short
        # trailing axis. Every value gets its global bin (column offset + bin in the
        # column), and one bincount counts them all.
        slot = self._current
        rows = columns.shape[1]
        finite = np.isfinite(columns)
        all_finite = bool(finite.all())
        extras = self._extras[slot]
        if all_finite:
            self._sums[slot] += columns.sum(axis=1)
        else:
            missing = np.isnan(columns)
            extras[:, MISSING] += missing.sum(axis=1)
            extras[:, NONFINITE] += (~finite & ~missing).sum(axis=1)
            self._sums[slot] += np.where(finite, columns, 0.0).sum(axis=1)
        bins = np.empty(columns.shape, dtype=np.int64)
        if len(self._numeric):
            values = columns[self._numeric]
            # bin = edges <= x, edge by edge into a small accumulator (the +inf
            # padding never counts); few edges, so int16 and one reused mask.
            below = np.zeros(values.shape, dtype=np.int16)
            mask = np.empty(values.shape, dtype=np.bool_)
            for edge in self._edges.T:
                np.greater_equal(values, edge[:, None], out=mask)
                below += mask
            bins[self._numeric] = below + self._numeric_offsets[:, None]
            outside = (values < self._low[:, None]) | (values > self._high[:, None])
            if not all_finite:
                outside &= finite[self._numeric]
            extras[self._numeric, OUT_OF_RANGE] += outside.sum(axis=1)
        for column in self._categorical:
            profile = self.profiles[column]
            assert isinstance(profile, CategoricalProfile)
            found, unknown = _categories(profile, columns[column])
            bins[column] = found + self.offsets[column]
            if not all_finite:
                unknown &= finite[column]
            extras[column, OUT_OF_RANGE] += int(unknown.sum())
        counted = bins.ravel() if all_finite else bins[finite]
        self._counts[slot] += np.bincount(counted, minlength=self._counts.shape[1])
        self._rows[slot] += rows
        self.rows_seen += rows

    def totals(self, now: float) -> Totals:
        live = (self._rows > 0) & (self._started > now - self.spec.count * self.spec.seconds)
        return Totals(
            rows=int(self._rows[live].sum()),
            counts=self._counts[live].sum(axis=0),
            extras=self._extras[live].sum(axis=0),
            sums=self._sums[live].sum(axis=0),
        )


def _categories(profile: CategoricalProfile, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin = the category's index; values of no reference category share the last bin."""
    known = profile.values
    position = np.searchsorted(known, values)
    np.minimum(position, len(known) - 1, out=position)
    unknown = known[position] != values
    position[unknown] = len(known)
    return position, unknown
