"""Canonical bytes of tensors: one layout, whatever the memory order or byte order.

Two requests whose rows hold the same values have the same canonical bytes,
so a result cache can key on them; a different dtype, shape or value always
gives different bytes. The layout is the V2 binary tensor layout: C order,
little-endian, and for BYTES each element as a 4-byte little-endian length
followed by its bytes. The HTTP codec writes binary outputs with the same
function.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np

from server.core.signature import Datatype, datatype_of


def tensor_bytes(datatype: Datatype, array: np.ndarray) -> bytes:
    """The whole tensor in the V2 binary layout."""
    if datatype is Datatype.BYTES:
        return _bytes_elements(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def row_bytes(inputs: Mapping[str, np.ndarray], rows: int) -> list[bytes]:
    """One canonical byte string per row of a batch (the first dimension of every input).

    Each row's string names every input in the mapping's order with its
    datatype and the shape of one row, then the row's values, so rows of
    different models or signatures never collide.
    """
    if rows == 1:
        return [one_row_bytes(inputs)]
    parts: list[list[bytes]] = [[] for _ in range(rows)]
    for name, array in inputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(f"input '{name}' has no leading dimension of {rows} rows")
        header = _header(name, array)
        if array.dtype.kind == "O":
            for index in range(rows):
                parts[index] += (header, _bytes_elements(array[index].reshape(-1)))
            continue
        flat = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        flat = flat.reshape(rows, -1)
        for index in range(rows):
            parts[index] += (header, flat[index].tobytes())
    return [b"".join(row) for row in parts]


_LITTLE = sys.byteorder == "little"
_HEADERS: dict[tuple[str, np.dtype[np.generic], tuple[int, ...]], bytes] = {}
# One-row inputs by (name, id(dtype), whole shape): the dtype itself, its header, and
# whether ``tobytes()`` already gives the canonical bytes (little-endian, not BYTES).
# Holding the dtype keeps its id from being reused; hashing a dtype costs 3x an int.
_ONE_ROW: dict[tuple[str, int, tuple[int, ...]], tuple[np.dtype[np.generic], bytes, bool]] = {}
_CACHED_HEADERS = 4096  # client-controlled shapes must not grow the tables without bound


def one_row_bytes(inputs: Mapping[str, np.ndarray]) -> bytes:
    """``row_bytes`` of a one-row batch, without the lists."""
    parts = []
    for name, array in inputs.items():
        shape = array.shape
        dtype = array.dtype
        found = _ONE_ROW.get((name, id(dtype), shape))
        if found is None or found[0] is not dtype:
            found = _one_row_layout(name, array)
        if found[2]:
            parts.append(found[1])
            parts.append(array.tobytes())  # C order, whatever the array's strides
        else:
            parts.append(_row_of_one(name, array))
    return b"".join(parts)


def _one_row_layout(name: str, array: np.ndarray) -> tuple[np.dtype[np.generic], bytes, bool]:
    if array.ndim == 0 or array.shape[0] != 1:
        raise ValueError(f"input '{name}' has no leading dimension of 1 rows")
    dtype = array.dtype
    order = dtype.byteorder
    plain = dtype.kind != "O" and (order in "<|" or (order == "=" and _LITTLE))
    found = (dtype, _header(name, array), plain)
    if len(_ONE_ROW) < _CACHED_HEADERS:
        _ONE_ROW[(name, id(dtype), array.shape)] = found
    return found


def _header(name: str, array: np.ndarray) -> bytes:
    """Name, datatype and row shape of one input; built once per distinct triple."""
    shape = array.shape[1:]
    key = (name, array.dtype, shape)
    found = _HEADERS.get(key)
    if found is None:
        native = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
        found = _build_header(name, datatype_of(np.empty(0, native)), shape)
        if len(_HEADERS) < _CACHED_HEADERS:
            _HEADERS[key] = found
    return found


def _build_header(name: str, datatype: Datatype, shape: tuple[int, ...]) -> bytes:
    encoded = name.encode()
    dims = b"".join(int(d).to_bytes(8, "little") for d in shape)
    return b"".join(
        [
            len(encoded).to_bytes(4, "little"),
            encoded,
            datatype.value.encode().ljust(8, b"\0"),
            len(shape).to_bytes(4, "little"),
            dims,
        ]
    )


def _row_of_one(name: str, array: np.ndarray) -> bytes:
    """One input of a one-row batch whose bytes need converting: BYTES or big-endian."""
    if array.ndim == 0 or array.shape[0] != 1:
        raise ValueError(f"input '{name}' has no leading dimension of 1 rows")
    if array.dtype.kind == "O":
        return _header(name, array) + _bytes_elements(array.reshape(-1))
    le = array.dtype.newbyteorder("<")
    return _header(name, array) + np.ascontiguousarray(array, dtype=le).tobytes()


def _bytes_elements(values: np.ndarray) -> bytes:
    parts = []
    for value in values:
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)
