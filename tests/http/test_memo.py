"""The codec memo on its own: what it gives is what decoding and encoding give."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from server.core.service import InferenceResult
from server.core.signature import Datatype, TensorSpec
from server.errors import InvalidInput
from server.http.codec import DecodedInfer, decode_infer, encode_infer
from server.http.memo import WINDOW, CodecMemo

SPECS = (
    TensorSpec("probability", Datatype.FP32, (-1,)),
    TensorSpec("label", Datatype.INT64, (-1, 2)),
)


def body(x: list[float], request_id: str | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(x)], "data": x}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps({**doc, **extra})


def binary(x: np.ndarray, request_id: str) -> tuple[bytes, str]:
    header = orjson.dumps(
        {
            "id": request_id,
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return header + x.tobytes(), str(len(header))


def result(decoded: DecodedInfer, request_id: str, scale: float = 1.0) -> InferenceResult:
    """What the data plane would answer: outputs computed from the decoded inputs."""
    x = decoded.request.inputs["features"]
    outputs = {
        "probability": (x.sum(axis=1) * scale).astype(np.float32),
        "label": np.stack([x.argmax(axis=1), x.argmin(axis=1)], axis=1).astype(np.int64),
    }
    return InferenceResult("fraud", 2, outputs, SPECS, request_id, "sha")


def answer(
    memo: CodecMemo, raw: bytes, generated: str, header: str | None = None, scale: float = 1.0
) -> tuple[tuple[bytes, int | None], tuple[bytes, int | None]]:
    """(the memo's answer, the codec's answer) for one request."""
    decoded = memo.decode(raw, header, "fraud", None)
    plain = decode_infer(raw, header, "fraud", None)
    assert decoded.request.id == plain.request.id
    assert decoded.request.outputs == plain.request.outputs
    assert decoded.request.parameters == plain.request.parameters
    assert decoded.binary_default == plain.binary_default
    np.testing.assert_array_equal(
        decoded.request.inputs["features"], plain.request.inputs["features"]
    )
    request_id = generated if decoded.request.id is None else decoded.request.id
    return (
        memo.encode(result(decoded, request_id, scale), decoded),
        encode_infer(result(plain, request_id, scale), plain),
    )


IDS = ["a", "a-much-longer-request-id-0001", "", "ünï-cødé €", "x" * 256]


def test_bodies_differing_in_their_id_share_one_entry_and_answer_with_their_own_id() -> None:
    memo = CodecMemo()
    x = [0.25, 1.5, -3.0]
    for request_id in IDS * 2:
        got, want = answer(memo, body(x, request_id), "unused")
        assert got == want
        assert orjson.loads(got[0])["id"] == request_id
    assert len(memo) == 1
    assert memo.hits == len(IDS) * 2 - 2, "kept at its second sighting, found from the third"


def test_without_an_id_each_answer_carries_the_id_it_was_given() -> None:
    memo = CodecMemo()
    for index in range(5):
        got, want = answer(memo, body([1.0, 2.0]), f"generated-{index}")
        assert got == want
    assert memo.hits == 3


def test_binary_answers_are_spliced_with_the_right_header_length() -> None:
    memo = CodecMemo()
    x = np.arange(6, dtype=np.float32).reshape(1, 6) / 7
    for request_id in IDS * 2:
        raw, header = binary(x, request_id)
        got, want = answer(memo, raw, "unused", header)
        assert got == want
        assert got[1] is not None
        assert orjson.loads(got[0][: got[1]])["id"] == request_id
    assert memo.hits == len(IDS) * 2 - 2


def test_outputs_that_changed_are_encoded_again() -> None:
    memo = CodecMemo()
    raw = body([1.0, 2.0, 3.0], "r")
    for _ in range(3):
        answer(memo, raw, "unused")
    got, want = answer(memo, raw, "unused", scale=2.0)  # say, a reloaded artifact
    assert got == want
    assert orjson.loads(got[0])["outputs"][0]["data"] == [12.0]


@pytest.mark.parametrize(
    "raw",
    [
        body([1.0], parameters={"id": "nested"}),  # an "id", but not the request's
        body([1.0], "twice", parameters={"id": "nested"}),  # "id" twice
        b'{"\\u0069d": "escaped", "inputs": [{"name": "features", "datatype": "FP32", '
        b'"shape": [1, 1], "data": [1.0]}]}',
        body([1.0], 'quote " and \\ backslash'),
        body([1.0], parameters={"tag": "id"}),  # "id" as a value
    ],
)
def test_bodies_it_cannot_key_soundly_are_never_kept_and_decode_as_without_it(
    raw: bytes,
) -> None:
    memo = CodecMemo()
    for index in range(4):
        got, want = answer(memo, raw, f"g{index}")
        assert got == want
    assert len(memo) == 0


def test_a_bad_body_fails_as_it_does_without_the_memo() -> None:
    memo = CodecMemo()
    bad = body([1.0], "r").replace(b'"FP32"', b'"FP33"')
    for _ in range(3):
        with pytest.raises(InvalidInput) as found:
            memo.decode(bad, None, "fraud", None)
        with pytest.raises(InvalidInput) as plain:
            decode_infer(bad, None, "fraud", None)
        assert str(found.value) == str(plain.value)
    too_long = body([1.0], "x" * 257)
    for _ in range(3):
        with pytest.raises(InvalidInput, match="at most 256"):
            memo.decode(too_long, None, "fraud", None)


def test_remembered_inputs_are_read_only_and_entries_stay_bounded() -> None:
    memo = CodecMemo(max_entries=8)
    for value in range(100):
        for _ in range(3):
            answer(memo, body([float(value)]), "g")
    assert len(memo) == 8
    decoded = memo.decode(body([99.0]), None, "fraud", None)
    assert decoded.memo is not None
    with pytest.raises(ValueError, match="read-only"):
        decoded.request.inputs["features"][0, 0] = 1.0


def test_after_traffic_that_never_repeats_repeated_bodies_are_found_again() -> None:
    memo = CodecMemo()
    for value in range(3 * WINDOW):  # cold: nothing found for a window and more
        answer(memo, body([float(value), 0.5]), "g")
    assert memo.hits == 0
    assert len(memo) == 0
    repeated = [body([float(value), 0.25], f"r{value}") for value in range(8)]
    for _ in range(2 * WINDOW // 8):
        for raw in repeated:
            answer(memo, raw, "g")
    before = memo.hits
    for raw in repeated * 4:
        got, want = answer(memo, raw, "g")
        assert got == want
    assert memo.hits - before == len(repeated) * 4, "warm again: every one found"
