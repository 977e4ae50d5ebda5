"""What every example model shares: its contract, data sets, metrics and the files of a version.

A version folder holds the artifact, ``card.yaml`` (lineage and holdout
metrics), ``reference.json`` (training-data and prediction profiles for the
drift monitor) and ``holdout.parquet`` (rows the model never saw). Everything
but the card is byte-identical when the same version is trained twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from numpy.typing import NDArray

SCHEMA_VERSION = 1
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DECILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Columns with at most this many distinct integral values are profiled by category.
MAX_CATEGORIES = 12
# Statistics are rounded so that the last bits of a platform's summation order
# do not leak into reference.json.
SIGNIFICANT_DIGITS = 12

Matrix = NDArray[np.float32]
Labels = NDArray[np.int8]
Columns = dict[str, NDArray[np.float64]]


class ContractError(Exception):
    """model.yaml does not declare what the training code needs."""


@dataclass(frozen=True, slots=True)
class Contract:
    """The parts of ``model.yaml`` that training must honour."""

    model: str
    input_name: str
    features: tuple[str, ...]
    outputs: tuple[str, ...]


def load_contract(model_dir: Path) -> Contract:
    """Read ``<model_dir>/model.yaml``; the feature order is ``inputs[0].feature_names``."""
    path = model_dir / "model.yaml"
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ContractError(f"{path}: cannot read: {exc}") from exc
    try:
        spec = doc["inputs"][0]
        features = tuple(str(name) for name in spec["feature_names"])
        outputs = tuple(str(out["name"]) for out in doc["outputs"])
        input_name = str(spec["name"])
        width = int(spec["shape"][1])
        datatype = spec["datatype"]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ContractError(f"{path}: missing or malformed inputs/outputs: {exc!r}") from exc
    if datatype != "FP32":
        raise ContractError(f"{path}: inputs[0].datatype must be FP32, got {datatype!r}")
    if width != len(features) or len(set(features)) != len(features):
        raise ContractError(
            f"{path}: inputs[0] declares {width} features but names "
            f"{len(features)} ({len(set(features))} distinct)"
        )
    return Contract(model_dir.name, input_name, features, outputs)


@dataclass(frozen=True, slots=True)
class Dataset:
    """Rows in model.yaml feature order: float32 features, int8 labels in {0, 1}."""

    features: Matrix
    labels: Labels

    @classmethod
    def from_columns(cls, columns: Columns, labels: NDArray[Any], names: Sequence[str]) -> Dataset:
        """Order generated columns as the contract names them; any mismatch is a bug."""
        missing = [n for n in names if n not in columns]
        extra = sorted(set(columns) - set(names))
        if missing or extra:
            raise ContractError(
                f"generator and model.yaml disagree: missing {missing}, extra {extra}"
            )
        matrix = np.column_stack([columns[n] for n in names]).astype(np.float32)
        return cls(np.ascontiguousarray(matrix), np.asarray(labels, dtype=np.int8))

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def split(self, holdout_rows: int) -> tuple[Dataset, Dataset]:
        """Train on the head, hold out the tail: rows are i.i.d., so no shuffle is needed."""
        cut = self.rows - holdout_rows
        if not 0 < cut < self.rows:
            raise ValueError(f"cannot hold out {holdout_rows} of {self.rows} rows")
        head = Dataset(self.features[:cut], self.labels[:cut])
        tail = Dataset(self.features[cut:], self.labels[cut:])
        return head, tail

    def digest(self) -> str:
        """sha256 of the canonical bytes: shape, little-endian float32 rows, int8 labels."""
        digest = hashlib.sha256()
        digest.update(f"{self.features.shape[0]}x{self.features.shape[1]}\n".encode())
        digest.update(self.features.astype("<f4", copy=False).tobytes(order="C"))
        digest.update(self.labels.astype("i1", copy=False).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Prediction:
    """One model output on the training rows; ``column`` picks the profiled column of a matrix."""

    values: NDArray[Any]
    column: int | None = None


@dataclass(frozen=True, slots=True)
class Trained:
    """What a recipe's ``fit`` hands back for one version."""

    artifact: bytes
    algorithm: str
    hyperparameters: dict[str, Any]
    train_outputs: dict[str, Prediction]
    holdout_scores: NDArray[Any]  # P(label == 1) for each holdout row, from the saved artifact
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Recipe:
    """How one example model is generated and trained, version by version."""

    name: str
    artifact: str
    seed: int
    rows: int
    holdout_rows: int
    versions: Mapping[int, str]  # version -> one-line description for the card
    generate: Callable[[int, int], tuple[Columns, NDArray[Any]]]  # (rows, seed) -> data
    fit: Callable[[int, Dataset, Dataset, Contract], Trained]
    generator: str  # importable name of ``generate``, for the card


def calibrate_intercept(logits: NDArray[np.float64], rate: float) -> float:
    """The shift that makes the mean of sigmoid(logits + shift) equal ``rate``.

    Generators write the label function freely and let this pin the base rate,
    so tuning a coefficient never silently moves the positive rate.
    """
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = (low + high) / 2
        if float(np.mean(sigmoid(logits + mid))) < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


# -- metrics ---------------------------------------------------------------------


def holdout_metrics(scores: NDArray[Any], labels: NDArray[Any]) -> dict[str, float]:
    """AUC, log-loss and accuracy at 0.5, as the server's quality monitor computes them live."""
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-15, 1 - 1e-15)
    y = np.asarray(labels, dtype=np.int64)
    return {
        "auc": round(float(roc_auc_score(y, p)), 6),
        "log_loss": round(float(log_loss(y, p, labels=[0, 1])), 6),
        "accuracy": round(float(accuracy_score(y, p >= 0.5)), 6),
        "positive_rate": round(float(y.mean()), 6),
    }


# -- reference profiles ------------------------------------------------------------


def category_label(value: float) -> str:
    """How a category value is written: integral floats as ``"0"``, ``"1"``; others by repr."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def is_categorical(values: NDArray[np.float64]) -> bool:
    """Binary flags and small counts: few distinct values, all integral."""
    finite = values[np.isfinite(values)]
    distinct = np.unique(finite)
    return 0 < len(distinct) <= MAX_CATEGORIES and bool(np.all(distinct == np.round(distinct)))


def profile_numeric(values: NDArray[Any]) -> dict[str, Any]:
    """Moments, quantiles and decile bins; bin i holds searchsorted(edges, x, 'right') == i."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if not len(finite):
        raise ValueError("no finite values to profile")
    # Round before de-duplicating so the written edges are exactly the ones binned against.
    edges = np.unique([_rounded(e) for e in np.quantile(finite, DECILES)])
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return {
        "kind": "numeric",
        "count": len(finite),
        "missing_rate": float(1 - len(finite) / len(x)),
        "mean": _rounded(float(finite.mean())),
        "std": _rounded(float(finite.std())),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "quantiles": {str(q): _rounded(float(np.quantile(finite, q))) for q in QUANTILES},
        "bin_edges": [float(e) for e in edges],
        "bin_fractions": [int(c) / len(finite) for c in counts],
    }


def profile_categorical(values: NDArray[Any]) -> dict[str, Any]:
    """Fractions of each distinct value, labelled by ``category_label``, in ascending order."""
    x = np.asarray(values, dtype=np.float64)
    present = x[np.isfinite(x)]
    if not len(present):
        raise ValueError("no finite values to profile")
    categories, counts = np.unique(present, return_counts=True)
    return {
        "kind": "categorical",
        "count": len(present),
        "missing_rate": float(1 - len(present) / len(x)),
        "categories": [category_label(c) for c in categories],
        "fractions": [int(c) / len(present) for c in counts],
    }


def build_reference(
    contract: Contract, version: int, train: Dataset, outputs: Mapping[str, Prediction]
) -> dict[str, Any]:
    """The reference.json document: training features in contract order, then predictions."""
    features: dict[str, Any] = {}
    for i, name in enumerate(contract.features):
        column = train.features[:, i].astype(np.float64)
        features[name] = (
            profile_categorical(column) if is_categorical(column) else profile_numeric(column)
        )
    predictions: dict[str, Any] = {}
    for name, output in outputs.items():
        values = output.values if output.column is None else output.values[:, output.column]
        predictions[name] = {**profile_numeric(values), "column": output.column}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": contract.model,
        "version": version,
        "rows": train.rows,
        "features": features,
        "predictions": predictions,
    }


def reference_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()


# -- files of a version folder -------------------------------------------------------


def write_holdout(path: Path, holdout: Dataset, names: Sequence[str]) -> None:
    """One float32 column per feature, in contract order, then ``label`` (int8)."""
    arrays = [pa.array(holdout.features[:, i], type=pa.float32()) for i in range(len(names))]
    arrays.append(pa.array(holdout.labels, type=pa.int8()))
    table = pa.Table.from_arrays(arrays, names=[*names, "label"])
    # Parquet carries no timestamps; fixed options keep the bytes stable across runs.
    pq.write_table(table, path, compression="zstd", compression_level=3, use_dictionary=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trained_at() -> str:
    """ISO-8601 UTC; ``SOURCE_DATE_EPOCH`` pins it for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            moment = dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC)
        except (ValueError, OverflowError, OSError) as exc:
            raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix timestamp") from exc
    else:
        moment = dt.datetime.now(tz=dt.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def code_revision() -> str:
    """The git commit of the training code, or ``"unknown"`` outside a checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def library_versions(extra: Mapping[str, str]) -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "scikit-learn": sklearn.__version__,
        **extra,
    }


def card_document(
    recipe: Recipe,
    version: int,
    contract: Contract,
    splits: tuple[Dataset, Dataset],
    trained: Trained,
    metrics: Mapping[str, float],
    files: Mapping[str, str],
) -> dict[str, Any]:
    """The model card: what was trained, on what, how well, and by which code."""
    train, holdout = splits
    return {
        "model": recipe.name,
        "version": version,
        "description": recipe.versions[version],
        "algorithm": trained.algorithm,
        "hyperparameters": trained.hyperparameters,
        "seed": recipe.seed,
        "data": {
            "generator": recipe.generator,
            "seed": recipe.seed,
            "sha256": train.digest(),
            "holdout_sha256": holdout.digest(),
            "rows": {"train": train.rows, "holdout": holdout.rows},
            "positive_rate": {
                "train": round(float(train.labels.mean()), 6),
                "holdout": round(float(holdout.labels.mean()), 6),
            },
        },
        "features": list(contract.features),
        "metrics": {"holdout": dict(metrics)},
        "artifact": {"file": recipe.artifact, "sha256": files[recipe.artifact]},
        "files": {name: digest for name, digest in files.items() if name != recipe.artifact},
        "trained_at": trained_at(),
        "code_revision": code_revision(),
        "approved_by": None,
        "libraries": library_versions(trained.libraries),
    }


def card_bytes(doc: Mapping[str, Any]) -> bytes:
    return yaml.safe_dump(dict(doc), sort_keys=False, width=100).encode()
