"""The result cache's row keys: what identifies one row of a version's inputs.

Outputs depend only on the validated inputs, so a row's key is the bytes of its
validated inputs. When every input of the signature has a fixed row shape and
a numeric datatype (``raw``, the common case: fraud, churn), the key is the
row's little-endian C-order values, input after input in signature order: all
keys of the version then have the same length and layout, so equal keys are
equal rows. Otherwise (a variable dimension, BYTES, a big-endian machine) the
key is the canonical bytes of ``server.core.tensors``, which name every
input, its datatype and its row shape before the values.

Before validation, a request gets a key only when it is already in its
validated form (``one``): exactly the signature's inputs in its order, each of
its datatype and of one row of its shape. Its key is then the one validation
would give, so a hit skips validation and is still a row that passed it, and
a request of another datatype or shape never finds a row by its bytes. Every
other request is validated first and keyed from what validation returned
(``rows``). Building the raw key is one ``tobytes()`` (0.1 us); the canonical
key of a one-row request cost 0.5 us and, on the serving path, about 6 % of
the throughput of a request the cache cannot answer.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np

from server.core.dispatch import Tensors
from server.core.signature import Datatype, TensorSpec
from server.core.tensors import one_row_bytes, row_bytes
from server.errors import ServingError


class RowKeys:
    """Keys of the rows of one version's inputs (``inputs``: its signature's inputs)."""

    def __init__(self, inputs: Sequence[TensorSpec]) -> None:
        self.names = [spec.name for spec in inputs]
        raw = bool(inputs) and sys.byteorder == "little" and all(_fixed(s) for s in inputs)
        self.scheme = "raw" if raw else "canonical"
        # name, dtype and shape of a one-row request already in its validated form
        self._forms = [(s.name, s.numpy_dtype, (1, *s.shape[1:])) for s in inputs] if raw else []
        self._single = self._forms[0] if len(self._forms) == 1 else None
        self._sizes = [s.numpy_dtype.itemsize * _elements(s) for s in inputs] if raw else []

    def one(self, inputs: Mapping[str, np.ndarray]) -> bytes | None:
        """The key of a one-row request not yet validated, when it is in its validated form."""
        single = self._single
        if single is not None:
            name, dtype, shape = single
            array = inputs.get(name)
            if array is None or len(inputs) != 1 or array.dtype is not dtype:
                return None
            return array.tobytes() if array.shape == shape else None
        if self.names and list(inputs) != self.names:
            return None
        if self._forms:
            parts = []
            for name, dtype, shape in self._forms:
                array = inputs[name]
                if array.dtype is not dtype or array.shape != shape:
                    return None
                parts.append(array.tobytes())
            return b"".join(parts)
        try:
            return one_row_bytes(inputs)
        except (ValueError, ServingError):
            return None  # not a well-formed batch of one: validation will say why

    def rows(self, inputs: Tensors, rows: int) -> list[bytes]:
        """The key of each row of validated inputs."""
        if not self._forms:
            return row_bytes(inputs, rows)
        blocks = [
            np.ascontiguousarray(inputs[name], dtype.newbyteorder("<")).tobytes()
            for name, dtype, _ in self._forms
        ]
        if len(blocks) == 1:
            [data], [size] = blocks, self._sizes
            return [data] if rows == 1 else [data[i * size : (i + 1) * size] for i in range(rows)]
        pairs = list(zip(blocks, self._sizes, strict=True))
        return [b"".join(b[i * size : (i + 1) * size] for b, size in pairs) for i in range(rows)]


def _fixed(spec: TensorSpec) -> bool:
    return spec.batched and spec.datatype is not Datatype.BYTES and -1 not in spec.shape[1:]


def _elements(spec: TensorSpec) -> int:
    count = 1
    for dim in spec.shape[1:]:
        count *= dim
    return count
