"""Correctness of responses: decode V2 outputs and compare them with expected values per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from loadtest.encoding import BYTES, NUMPY_TYPES
from loadtest.errors import DataError
from loadtest.tables import numeric_columns, read_table

Matrix = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True, slots=True)
class ExpectedOutputs:
    """Expected values per output name, one row of the rows file per matrix row."""

    values: Mapping[str, Matrix]

    @property
    def rows(self) -> int:
        return min(len(v) for v in self.values.values())


def load_expected(path: Path, output_names: Sequence[str]) -> ExpectedOutputs:
    """Read ``{"output": [row values, ...]}`` JSON, or Parquet/CSV with a column per output.

    Table columns may be named ``output`` (one value per row, or a list) or
    ``output_0``, ``output_1``... for several values per row. A table with one
    numeric column stands for a model's only output whatever its name.
    """
    if path.suffix.lower() == ".json":
        values = _from_json(path)
    else:
        values = _from_table(read_table(path), output_names)
    unknown = sorted(set(values) - set(output_names)) if output_names else []
    if unknown:
        raise DataError(f"{path}: the model has no outputs named {unknown}")
    if not values:
        raise DataError(f"{path}: no expected values for outputs {list(output_names)}")
    return ExpectedOutputs(values)


def _from_json(path: Path) -> dict[str, Matrix]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read expected outputs ({exc})") from exc
    if isinstance(doc, dict) and isinstance(doc.get("outputs"), dict):
        doc = doc["outputs"]
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object of output name -> values per row")
    try:
        return {str(k): _matrix(np.asarray(v, dtype=np.float64)) for k, v in doc.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: expected values must be numbers or rectangular lists") from exc


def _from_table(table: pa.Table, output_names: Sequence[str]) -> dict[str, Matrix]:
    values: dict[str, Matrix] = {}
    for name in output_names:
        if name in table.column_names:
            values[name] = _column_matrix(table.column(name))
            continue
        parts = [
            c
            for c in table.column_names
            if c.startswith(f"{name}_") and c[len(name) + 1 :].isdigit()
        ]
        if parts:
            parts.sort(key=lambda c: int(c[len(name) + 1 :]))
            values[name] = np.column_stack([_column_matrix(table.column(c)) for c in parts])
    numeric = numeric_columns(table)
    if not values and len(output_names) == 1 and len(numeric) == 1:
        values[output_names[0]] = _column_matrix(table.column(numeric[0]))
    return values


def _column_matrix(column: pa.ChunkedArray) -> Matrix:
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return _matrix(np.asarray(column.to_pylist(), dtype=np.float64))
    return _matrix(column.to_numpy(zero_copy_only=False).astype(np.float64))


def _matrix(values: np.ndarray[Any, Any]) -> Matrix:
    return values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)


def decode_outputs(body: bytes, split: int) -> dict[str, np.ndarray[Any, Any]]:
    """Output tensors of a V2 response, JSON or binary; ``split`` is the JSON header length."""
    header = body if split < 0 else body[:split]
    doc = orjson.loads(header)
    offset = len(header)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for out in doc["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            tensors[out["name"]] = np.asarray(out["data"])
            continue
        if out["datatype"] == BYTES:
            raise ValueError("binary BYTES outputs cannot be compared")
        chunk = body[offset : offset + int(size)]
        offset += int(size)
        tensors[out["name"]] = np.frombuffer(chunk, dtype=NUMPY_TYPES[out["datatype"]])
    return tensors


class OutputChecker:
    """Compares each response with the expected rows it answers, within tolerances."""

    def __init__(self, expected: ExpectedOutputs, rtol: float = 1e-5, atol: float = 1e-6) -> None:
        self.expected = expected
        self.rtol = rtol
        self.atol = atol

    def check(self, rows: np.ndarray[Any, np.dtype[np.int64]], body: bytes, split: int) -> bool:
        try:
            got = decode_outputs(body, split)
        except (ValueError, KeyError, TypeError):
            return False
        for name, table in self.expected.values.items():
            tensor = got.get(name)
            if tensor is None:
                return False
            try:
                want = table[rows]
                actual = tensor.astype(np.float64).reshape(want.shape)
            except (ValueError, IndexError):
                return False
            if not np.allclose(actual, want, rtol=self.rtol, atol=self.atol, equal_nan=True):
                return False
        return True
