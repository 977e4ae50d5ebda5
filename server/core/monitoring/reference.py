"""Reference profiles: the training-data summary in ``<version>/reference.json``.

Numeric columns carry interior bin edges and the fraction of reference rows in
each bin (bin ``i`` = ``np.searchsorted(edges, x, side="right")``); categorical
columns carry value labels and their fractions. ``build_reference`` writes the
same schema, for tests and for anyone profiling a data set by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

SCHEMA_VERSION = 1
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


class ProfileError(Exception):
    """reference.json is missing a field or holds a value of the wrong shape."""


@dataclass(frozen=True, slots=True)
class NumericProfile:
    count: int
    missing_rate: float
    mean: float
    std: float
    min: float
    max: float
    edges: np.ndarray
    fractions: np.ndarray
    column: int | None = None

    @property
    def bins(self) -> int:
        return len(self.fractions)


@dataclass(frozen=True, slots=True)
class CategoricalProfile:
    """Fractions per category; live values outside ``categories`` count as an extra bin."""

    count: int
    missing_rate: float
    categories: tuple[str, ...]
    values: np.ndarray  # the labels as numbers, sorted as ``categories``
    fractions: np.ndarray
    column: int | None = None

    @property
    def bins(self) -> int:
        return len(self.fractions) + 1


Profile = NumericProfile | CategoricalProfile


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    model: str
    version: int
    rows: int
    features: dict[str, Profile]
    predictions: dict[str, Profile]
    sha256: str


def load_reference(path: Path) -> ReferenceProfile:
    """Read and validate reference.json; ProfileError names the file and field."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
    return parse_reference(doc, str(path), hashlib.sha256(raw).hexdigest())


def parse_reference(doc: Any, where: str, sha256: str = "") -> ReferenceProfile:
    if not isinstance(doc, dict):
        raise ProfileError(f"{where}: expected a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ProfileError(
            f"{where}: schema_version {doc.get('schema_version')!r} is not {SCHEMA_VERSION}"
        )
    features = _section(doc, "features", where)
    predictions = _section(doc, "predictions", where) if "predictions" in doc else {}
    return ReferenceProfile(
        model=str(doc.get("model", "")),
        version=int(doc.get("version") or 0),
        rows=int(doc.get("rows") or 0),
        features={k: _profile(v, f"{where}: features.{k}") for k, v in features.items()},
        predictions={k: _profile(v, f"{where}: predictions.{k}") for k, v in predictions.items()},
        sha256=sha256,
    )


def _section(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = doc.get(key)
    if not isinstance(section, dict):
        raise ProfileError(f"{where}: '{key}' must be an object of column profiles")
    return section


def _profile(raw: Any, where: str) -> Profile:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected an object")
    try:
        raw_column = raw.get("column")
        column = None if raw_column is None else int(raw_column)
        count = int(raw.get("count", 0))
        missing_rate = float(raw.get("missing_rate", 0.0))
        kind = raw.get("kind")
        if kind == "numeric":
            edges = np.asarray(raw["bin_edges"], dtype=np.float64)
            fractions = _fractions(raw["bin_fractions"], where)
            if len(fractions) != len(edges) + 1 or np.any(np.diff(edges) < 0):
                raise ProfileError(
                    f"{where}: need ascending bin_edges and len(bin_edges) + 1 bin_fractions"
                )
            return NumericProfile(
                mean=float(raw.get("mean", np.nan)),
                std=float(raw.get("std", np.nan)),
                min=float(raw.get("min", -np.inf)),
                max=float(raw.get("max", np.inf)),
                edges=edges,
                fractions=fractions,
                count=count,
                missing_rate=missing_rate,
                column=column,
            )
        if kind == "categorical":
            labels = [str(c) for c in raw["categories"]]
            fractions = _fractions(raw["fractions"], where)
            if len(labels) != len(fractions) or len(set(labels)) != len(labels):
                raise ProfileError(f"{where}: need unique categories, one fraction each")
            values = np.array([_number(c) for c in labels], dtype=np.float64)
            order = np.argsort(values, kind="stable")
            return CategoricalProfile(
                categories=tuple(labels[i] for i in order),
                values=values[order],
                fractions=fractions[order],
                count=count,
                missing_rate=missing_rate,
                column=column,
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: {type(exc).__name__}: {exc}") from exc
    raise ProfileError(f"{where}: kind must be 'numeric' or 'categorical', got {kind!r}")


def _fractions(raw: Any, where: str) -> np.ndarray:
    fractions = np.asarray(raw, dtype=np.float64)
    if fractions.ndim != 1 or not len(fractions) or np.any(fractions < 0):
        raise ProfileError(f"{where}: fractions must be a non-empty list of numbers >= 0")
    total = fractions.sum()
    return fractions / total if total > 0 else np.full(len(fractions), 1 / len(fractions))


def _number(label: str) -> float:
    try:
        return float(label)
    except ValueError:
        return float("nan")  # a string category: live numeric values never match it


def category_label(value: float) -> str:
    """How a category value is written: integral floats as ``"0"``, ``"1"``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- building a profile -------------------------------------------------------


def profile_numeric(values: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """A numeric profile with quantile bin edges (deciles by default)."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if not len(finite):
        raise ValueError("no finite values to profile")
    cuts = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(cuts)
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return {
        "kind": "numeric",
        "count": len(finite),
        "missing_rate": float(1 - len(finite) / len(x)),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "quantiles": {str(q): float(np.quantile(finite, q)) for q in QUANTILES},
        "bin_edges": edges.tolist(),
        "bin_fractions": (counts / len(finite)).tolist(),
    }


def profile_categorical(values: np.ndarray) -> dict[str, Any]:
    x = np.asarray(values, dtype=np.float64)
    present = x[~np.isnan(x)]
    categories, counts = np.unique(present, return_counts=True)
    return {
        "kind": "categorical",
        "count": len(present),
        "missing_rate": float(1 - len(present) / len(x)) if len(x) else 0.0,
        "categories": [category_label(c) for c in categories],
        "fractions": (counts / max(len(present), 1)).tolist(),
    }


def build_reference(
    model: str,
    version: int,
    features: Mapping[str, np.ndarray],
    predictions: Mapping[str, tuple[np.ndarray, int | None]],
    categorical: frozenset[str] = frozenset(),
    bins: int = 10,
) -> dict[str, Any]:
    """A reference.json document: ``features`` by name, ``predictions`` as (values, column)."""
    rows = len(next(iter(features.values()))) if features else 0

    def profile(name: str, values: np.ndarray) -> dict[str, Any]:
        if name in categorical:
            return profile_categorical(values)
        return profile_numeric(values, bins)

    outputs = {}
    for name, (values, column) in predictions.items():
        picked = values if column is None else values[:, column]
        outputs[name] = {**profile(name, picked), "column": column}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "version": version,
        "rows": rows,
        "features": {name: profile(name, values) for name, values in features.items()},
        "predictions": outputs,
    }
