"""Fixed-width columns between numpy and Arrow through their buffers, without pandas.

pyarrow's ``pa.array``, ``pa.scalar`` and ``Array.to_numpy`` import pandas the
first time any of them runs, wherever pandas is installed, only to check
whether they were handed a pandas object: 0.15 s of the 0.75 s before a
``sluice batch`` run writes its first rows, for a library the job never uses.
A column of fixed-width numbers is a validity bitmap and one values buffer,
which numpy reads and Arrow wraps without a copy, so these do it directly.
Other types (booleans are bits, text is offsets) go through pyarrow's own
functions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Arrow's fixed-width numbers and their numpy dtypes (little-endian, as Arrow's buffers).
_NUMPY: dict[pa.DataType, np.dtype] = {
    kind: np.dtype(name)
    for kind, name in (
        (pa.float16(), "<f2"), (pa.float32(), "<f4"), (pa.float64(), "<f8"),
        (pa.int8(), "i1"), (pa.int16(), "<i2"), (pa.int32(), "<i4"), (pa.int64(), "<i8"),
        (pa.uint8(), "u1"), (pa.uint16(), "<u2"), (pa.uint32(), "<u4"), (pa.uint64(), "<u8"),
    )
}  # fmt: skip


def nulls(col: pa.Array) -> np.ndarray | None:
    """Where ``col`` is null, as booleans; None when no value is."""
    if not col.null_count:
        return None
    validity = col.buffers()[0]
    if validity is None:  # a type without a bitmap (null type): every value is null
        return np.ones(len(col), dtype=bool)
    bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
    missing: np.ndarray = bits[col.offset : col.offset + len(col)] == 0
    return missing


def values(col: pa.Array) -> np.ndarray:
    """A numeric column's values as numpy (a read-only view when it has no nulls).

    Nulls of a float column become NaN, as ``to_numpy(zero_copy_only=False)`` gives.
    """
    dtype = _NUMPY.get(col.type)
    if dtype is None:
        return np.asarray(col.to_numpy(zero_copy_only=False))
    if not len(col):
        return np.empty(0, dtype)
    data = np.frombuffer(col.buffers()[1], dtype, count=col.offset + len(col))[col.offset :]
    missing = nulls(col)
    if missing is None:
        return data
    if dtype.kind != "f":
        return np.asarray(col.to_numpy(zero_copy_only=False))  # integers with nulls: floats
    data = data.copy()
    data[missing] = np.nan
    return data


def array(data: np.ndarray, kind: pa.DataType) -> pa.Array:
    """``pa.array(data, type=kind)`` for 1-D numbers, sharing ``data``'s memory where it can."""
    dtype = _NUMPY.get(kind)
    if dtype is None or data.dtype.kind not in "biuf" or data.ndim != 1:
        return pa.array(data, type=kind)
    contiguous = np.ascontiguousarray(data, dtype=dtype)
    return pa.Array.from_buffers(kind, len(contiguous), [None, pa.py_buffer(contiguous)])


def constant_int(value: int, rows: int) -> pa.Array:
    """An int64 column of ``rows`` times ``value``."""
    return array(np.full(rows, value, dtype=np.int64), pa.int64())


def constant_text(value: str, rows: int) -> pa.Array:
    """A string column of ``rows`` times ``value``."""
    encoded = value.encode()
    if rows * len(encoded) >= 2**31:  # past 32-bit offsets: Arrow's own
        return pa.repeat(pa.scalar(value, pa.string()), rows)
    offsets = np.arange(rows + 1, dtype=np.int32) * len(encoded)
    return pa.Array.from_buffers(
        pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * rows)]
    )
