"""Canonical bytes of tensors: one layout, whatever the memory order or byte order.

Two requests whose rows hold the same values have the same canonical bytes,
so a result cache can key on them; a different dtype, shape or value always
gives different bytes. The layout is the V2 binary tensor layout: C order,
little-endian, and for BYTES each element as a 4-byte little-endian length
followed by its bytes. The HTTP codec writes binary outputs with the same
function.
"""

from __future__ import annotations

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
    parts: list[list[bytes]] = [[] for _ in range(rows)]
    for name, array in inputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(f"input '{name}' has no leading dimension of {rows} rows")
        datatype = datatype_of(
            array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
        )
        header = _header(name, datatype, array.shape[1:])
        if datatype is Datatype.BYTES:
            for index in range(rows):
                parts[index] += (header, _bytes_elements(array[index].reshape(-1)))
            continue
        flat = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        flat = flat.reshape(rows, -1)
        for index in range(rows):
            parts[index] += (header, flat[index].tobytes())
    return [b"".join(row) for row in parts]


def _header(name: str, datatype: Datatype, shape: tuple[int, ...]) -> bytes:
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


def _bytes_elements(values: np.ndarray) -> bytes:
    parts = []
    for value in values:
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)
