"""Pools of pre-encoded inference requests, from a rows file or random data.

Everything is encoded before the run so the hot loop only writes bytes; the
pool is cycled through, so a few hundred distinct bodies defeat trivial
response caching without costing memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loadtest.encoding import BYTES, Tensor, encode_binary, encode_json, frame_post, numpy_type
from loadtest.errors import DataError
from loadtest.tables import numeric_columns, read_table
from loadtest.target import ModelMetadata, Target, TensorMeta


@dataclass(frozen=True, slots=True)
class BodySpec:
    """How to build request bodies.

    ``shapes`` fills variable dimensions other than the batch one: for a batched
    input (leading -1) it gives the dimensions after the batch, otherwise the
    whole shape.
    """

    rows_per_request: int = 1
    binary: bool = False
    binary_output: bool = False
    pool_size: int = 256
    seed: int = 0
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestPool:
    """Complete HTTP requests ready to write, and which dataset rows each one carries."""

    requests: tuple[bytes, ...]
    rows_per_request: int
    row_ids: tuple[np.ndarray[Any, np.dtype[np.int64]], ...] | None = None

    def __post_init__(self) -> None:
        if not self.requests:
            raise DataError("the request pool is empty")

    @property
    def mean_request_bytes(self) -> float:
        return sum(map(len, self.requests)) / len(self.requests)


def pool_from_tensors(
    target: Target,
    batches: Sequence[Sequence[Tensor]],
    spec: BodySpec,
    row_ids: Sequence[np.ndarray[Any, np.dtype[np.int64]]] | None = None,
) -> RequestPool:
    """Encode one request per batch of tensors, framed for ``target``'s infer path."""
    encode = encode_binary if spec.binary else encode_json
    requests = tuple(
        frame_post(target.host_header, target.infer_path, encode(b, spec.binary_output))
        for b in batches
    )
    return RequestPool(requests, spec.rows_per_request, tuple(row_ids) if row_ids else None)


def random_pool(target: Target, meta: ModelMetadata, spec: BodySpec) -> RequestPool:
    """Random tensors shaped and typed by the model metadata (seeded, so repeatable)."""
    rng = np.random.default_rng(spec.seed)
    shapes = {t.name: request_shape(t, spec) for t in meta.inputs}
    batches = [
        [Tensor(t.name, t.datatype, _random(rng, t.datatype, shapes[t.name])) for t in meta.inputs]
        for _ in range(spec.pool_size)
    ]
    return pool_from_tensors(target, batches, spec)


def rows_pool(target: Target, meta: ModelMetadata, table: pa.Table, spec: BodySpec) -> RequestPool:
    """Requests of ``rows_per_request`` consecutive rows each, wrapping around the table."""
    n_rows = table.num_rows
    if n_rows == 0:
        raise DataError("the rows file has no rows")
    columns = {t.name: _input_matrix(table, t, meta) for t in meta.inputs}
    per = spec.rows_per_request
    count = min(spec.pool_size, math.ceil(n_rows / per))
    ids = [(np.arange(per, dtype=np.int64) + i * per) % n_rows for i in range(count)]
    batches = [
        [Tensor(t.name, t.datatype, columns[t.name][rows]) for t in meta.inputs] for rows in ids
    ]
    return pool_from_tensors(target, batches, spec, ids)


def build_pool(
    target: Target, meta: ModelMetadata, spec: BodySpec, rows: Path | None = None
) -> RequestPool:
    """The CLI's choice: rows from a file when given, random data otherwise."""
    if spec.rows_per_request < 1 or spec.pool_size < 1:
        raise DataError("rows per request and pool size must be at least 1")
    if rows is None:
        return random_pool(target, meta, spec)
    return rows_pool(target, meta, read_table(rows), spec)


def request_shape(tensor: TensorMeta, spec: BodySpec) -> tuple[int, ...]:
    """The full shape to send: batch dimension set to ``rows_per_request``."""
    shape = tensor.shape
    batched = bool(shape) and shape[0] == -1
    rest = shape[1:] if batched else shape
    override = spec.shapes.get(tensor.name)
    if override is not None:
        rest = override
    if any(d < 0 for d in rest):
        raise DataError(
            f"input {tensor.name!r} has variable dimensions {list(shape)}: "
            f"give them with --shape {tensor.name}:d1,d2,..."
        )
    return (spec.rows_per_request, *rest) if batched else tuple(rest)


def _random(
    rng: np.random.Generator, datatype: str, shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    if datatype == BYTES:
        letters = rng.integers(97, 123, size=(*shape, 8), dtype=np.uint8)
        flat = [bytes(row) for row in letters.reshape(-1, 8)]
        return np.array(flat, dtype=object).reshape(shape)
    dtype = numpy_type(datatype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _input_matrix(table: pa.Table, tensor: TensorMeta, meta: ModelMetadata) -> np.ndarray[Any, Any]:
    """The input's values for every row: shape ``(rows, *element_shape)``."""
    names = _columns_for(table, tensor, meta)
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(f"the rows file lacks feature columns of {tensor.name!r}: {missing[:5]}")
    element = tuple(tensor.shape[1:]) if tensor.shape and tensor.shape[0] == -1 else ()
    width = math.prod(element) if element and all(d >= 0 for d in element) else len(names)
    if width != len(names):
        raise DataError(
            f"input {tensor.name!r} takes {width} values per row, the rows file gives {len(names)}"
        )
    dtype = object if tensor.datatype == BYTES else numpy_type(tensor.datatype)
    try:
        matrix = np.column_stack(
            [table.column(n).to_numpy(zero_copy_only=False).astype(dtype) for n in names]
        )
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise DataError(
            f"rows for input {tensor.name!r} do not convert to {tensor.datatype}"
        ) from exc
    if not element:
        element = (len(names),) if len(tensor.shape) > 1 else ()
    return matrix.reshape((table.num_rows, *element))


def _columns_for(table: pa.Table, tensor: TensorMeta, meta: ModelMetadata) -> list[str]:
    if tensor.feature_names:
        return list(tensor.feature_names)
    if tensor.name in table.column_names:
        return [tensor.name]
    if len(meta.inputs) == 1:
        numeric = numeric_columns(table)
        if numeric:
            return numeric
    raise DataError(
        f"cannot tell which columns feed input {tensor.name!r}: the model gives no feature "
        "names and no column has the input's name"
    )
