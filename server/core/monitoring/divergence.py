"""Distances between a live and a reference distribution over the same bins.

PSI fills empty bins with ``EPS`` (Evidently's convention) so one empty bin
does not make it infinite. The Jensen-Shannon distance uses base 2, so it lies
in [0, 1] (NannyML's convention; scipy's default natural log tops out at 0.83).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import chdtrc

EPS = 1e-4


@dataclass(frozen=True, slots=True)
class Comparison:
    psi: float
    js: float
    chi2: float
    p_value: float


def psi(live: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two fraction vectors."""
    p = np.where(live > 0, live, EPS)
    q = np.where(reference > 0, reference, EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def js_distance(live: np.ndarray, reference: np.ndarray) -> float:
    """Jensen-Shannon distance (square root of the divergence), base 2."""
    m = (live + reference) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(np.sqrt(max(0.5 * kl(live) + 0.5 * kl(reference), 0.0)))


def chi2_homogeneity(
    live_counts: np.ndarray, reference: np.ndarray, reference_count: int
) -> tuple[float, float]:
    """Chi-squared test that live counts and the reference come from one distribution.

    A 2 x k contingency table of live counts against the reference fractions
    scaled to the reference row count; bins empty on both sides are dropped.
    """
    ref_counts = reference * max(reference_count, 1)
    keep = (live_counts + ref_counts) > 0
    live, ref = live_counts[keep].astype(np.float64), ref_counts[keep]
    if len(live) < 2 or live.sum() == 0:
        return 0.0, 1.0
    total_live, total_ref = live.sum(), ref.sum()
    column = live + ref
    expected_live = column * total_live / (total_live + total_ref)
    expected_ref = column * total_ref / (total_live + total_ref)
    stat = float(
        np.sum((live - expected_live) ** 2 / expected_live)
        + np.sum((ref - expected_ref) ** 2 / expected_ref)
    )
    return stat, float(chdtrc(len(live) - 1, stat))


def compare(live_counts: np.ndarray, reference: np.ndarray, reference_count: int) -> Comparison:
    """Every statistic for one column; ``live_counts`` are raw counts per bin."""
    total = live_counts.sum()
    live = live_counts / total if total else np.zeros(len(live_counts))
    stat, p_value = chi2_homogeneity(live_counts, reference, reference_count)
    return Comparison(psi(live, reference), js_distance(live, reference), stat, p_value)
