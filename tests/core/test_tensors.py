"""Canonical tensor bytes: equal values give equal bytes, anything else differs."""

from __future__ import annotations

import numpy as np
import pytest

from server.core.signature import Datatype
from server.core.tensors import row_bytes, tensor_bytes

RNG = np.random.default_rng(7)
X = RNG.normal(size=(3, 5)).astype(np.float32)


def test_rows_of_a_batch_equal_the_same_rows_sent_alone() -> None:
    batch = row_bytes({"features": X}, 3)
    alone = [row_bytes({"features": X[i : i + 1]}, 1)[0] for i in range(3)]
    assert batch == alone
    assert len(set(batch)) == 3


def test_memory_layout_and_byte_order_do_not_change_the_bytes() -> None:
    fortran = np.asfortranarray(X)
    big_endian = X.astype(X.dtype.newbyteorder(">"))
    strided = np.concatenate([X, X], axis=1)[:, ::2][:, :5]
    strided[:] = X
    expected = row_bytes({"features": X}, 3)
    for other in (fortran, big_endian, strided):
        assert row_bytes({"features": other}, 3) == expected


@pytest.mark.parametrize(
    "other",
    [
        X.astype(np.float64),  # same values, other datatype
        X.reshape(3, 5, 1),  # same values, other row shape
        X + np.float32(1e-7) * (X[0, 0] == X),  # one element differs
    ],
    ids=["dtype", "shape", "value"],
)
def test_a_different_dtype_shape_or_value_gives_different_bytes(other: np.ndarray) -> None:
    assert row_bytes({"features": other}, 3)[0] != row_bytes({"features": X}, 3)[0]


def test_input_names_and_boundaries_are_part_of_the_bytes() -> None:
    a = np.arange(4, dtype=np.int32).reshape(1, 4)
    split = {"a": a[:, :2], "b": a[:, 2:]}
    assert row_bytes(split, 1) != row_bytes({"a": a}, 1)
    assert row_bytes({"a": a[:, :2], "b": a[:, 2:]}, 1) != row_bytes(
        {"b": a[:, :2], "a": a[:, 2:]}, 1
    )


def test_bytes_tensors_are_length_prefixed() -> None:
    words = np.empty((2, 2), dtype=object)
    words[:] = [[b"ab", b"c"], [b"a", b"bc"]]
    first, second = row_bytes({"text": words}, 2)
    assert first != second, "the same concatenation, split differently"
    assert tensor_bytes(Datatype.BYTES, words[0]) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_tensor_bytes_is_little_endian_c_order() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3))
    assert tensor_bytes(Datatype.INT32, fortran) == np.arange(6, dtype="<i4").tobytes()


def test_a_tensor_without_the_batch_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="input 'features'"):
        row_bytes({"features": X}, 4)


def test_a_row_alone_has_the_same_bytes_whatever_its_layout_or_byte_order() -> None:
    row = X[1:2]
    wide = np.zeros((1, 10), dtype=np.float32)
    wide[:, ::2] = row
    expected = row_bytes({"features": X}, 3)[1]
    for other in (
        row,
        np.asfortranarray(row),
        row.astype(row.dtype.newbyteorder(">")),
        wide[:, ::2],
    ):
        assert row_bytes({"features": other}, 1) == [expected]
    with pytest.raises(ValueError, match="leading dimension"):
        row_bytes({"features": X[:2]}, 1)
