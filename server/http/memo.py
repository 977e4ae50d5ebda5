"""Recent identical infer bodies: their decoded request and their last encoded answer.

Clients repeat themselves (retries, dashboards polling, hot keys), and a
repeated body is decoded again into the same tensors and its same outputs
are encoded again into the same bytes: in process, for a 1x30 JSON request
to fraud answered from the result cache, 4 of its 19 µs went to decoding and
1.4 to encoding. ``CodecMemo`` stands in for those two pure functions and
nothing else. Every request still goes to ``DataPlane.infer``, which chooses
the version, answers from the result cache or the model, counts the answer
for that version and hands it to drift, feedback and the prediction log; the
memo only skips parsing bytes it has parsed before, and re-encoding outputs
equal, bit for bit, to the ones it encoded last for that body.

The request id. A V2 body may carry an ``id``, which the answer repeats, so
requests that differ only in their ids are one entry: the key is the body
without the id's characters (and where they were), and the answer is kept
as the bytes before and after its id, the current request's id spliced in.
A body with an id is kept only when that is sound: no backslash in its JSON
(no escaped key can be an ``id``) and ``"id"`` once, a key followed by a
string that needs no unescaping.

Bounds. Bodies up to ``MAX_BODY`` bytes, ``MAX_ENTRIES`` entries and about
``MAX_BYTES`` bytes, least recently used out first. A body is kept the second
time it is seen (a set of recent hashes remembers the first). Traffic that
never repeats keeps nothing, and once fewer than 1 in 16 of a window of
bodies were found the memo turns cold: only one body in ``COLD_SAMPLE`` is
looked up until they are found again (+0.3 µs per request that never
repeats, against 4 µs saved per repeat, 1x30 JSON).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from server.core.service import InferenceRequest, InferenceResult
from server.core.signature import Datatype, TensorSpec
from server.http.codec import MAX_ID_CHARS, DecodedInfer, decode_infer, encode_infer

MAX_BODY = 16 * 1024
MAX_ENTRIES = 4096
MAX_BYTES = 32 * 1024 * 1024
SEEN = 65_536  # first sightings remembered (hashes) before the set starts again
WINDOW = 1024  # bodies between two decisions on whether the memo is cold
COLD_SAMPLE = 8
ENTRY_OVERHEAD = 1024  # objects and dictionary slots of one entry, roughly
_WHITESPACE = frozenset(b" \t\r\n")
_CONTROL = bytes(range(32))

# The body less its id's characters, the JSON header's length less them, where they
# were (-1: no id), the model and the version of the path.
MemoKey = tuple[bytes, int, int, str, int | None]


@dataclass(slots=True)
class Answer:
    """An encoded answer as the bytes around its request id, and the outputs it encodes."""

    model: str
    version: int
    specs: tuple[TensorSpec, ...]
    outputs: tuple[tuple[np.dtype[Any], tuple[int, ...], bytes], ...]  # per spec, C order
    prefix: bytes  # up to the id's opening quote
    suffix: bytes  # after its closing quote: the rest of the JSON and any binary outputs
    tail: int | None  # JSON bytes in ``suffix`` when outputs are binary; None: a JSON answer

    @classmethod
    def of(cls, result: InferenceResult, payload: bytes, header: int | None) -> Answer | None:
        """``payload`` (``encode_infer``'s) taken apart around its id; None when it cannot be."""
        if result.id is None:
            return None
        outputs = []
        for spec in result.specs:
            array = result.outputs[spec.name]
            if array.dtype.kind == "O":  # bytes of object arrays are pointers, not values
                return None
            outputs.append((array.dtype, array.shape, array.tobytes()))
        doc = {"model_name": result.model, "model_version": str(result.version)}
        prefix = orjson.dumps(doc)[:-1] + b',"id":'
        quoted = orjson.dumps(result.id)
        if not payload.startswith(prefix + quoted):
            return None
        suffix = payload[len(prefix) + len(quoted) :]
        tail = None if header is None else header - len(prefix) - len(quoted)
        return cls(result.model, result.version, result.specs, tuple(outputs), prefix, suffix, tail)

    @property
    def nbytes(self) -> int:
        return len(self.prefix) + len(self.suffix) + sum(len(raw) for _, _, raw in self.outputs)

    def fits(self, result: InferenceResult) -> bool:
        """Whether ``result`` encodes to this answer (with its own id)."""
        if result.model != self.model or result.version != self.version:
            return False
        specs = result.specs
        if specs is not self.specs and _named(specs) != _named(self.specs):
            return False
        got = result.outputs
        for spec, (dtype, shape, raw) in zip(specs, self.outputs, strict=True):
            array = got[spec.name]
            if array.shape != shape or array.tobytes() != raw:
                return False
            if array.dtype is not dtype and array.dtype != dtype:
                return False
        return result.id is not None

    def splice(self, request_id: str) -> tuple[bytes, int | None]:
        """The answer with ``request_id``: what ``encode_infer`` gives, byte for byte."""
        quoted = orjson.dumps(request_id)
        payload = b"".join((self.prefix, quoted, self.suffix))
        if self.tail is None:
            return payload, None
        return payload, len(self.prefix) + len(quoted) + self.tail


@dataclass(slots=True)
class MemoEntry:
    """What decoding one body gave (less its id), and its last answer once encoded."""

    key: MemoKey
    inputs: dict[str, np.ndarray]  # read-only once kept: requests share them
    outputs: list[str] | None
    parameters: Mapping[str, Any]
    binary_default: bool
    binary_outputs: dict[str, bool]
    answer: Answer | None = None
    kept: bool = False


class CodecMemo:
    """``decode_infer`` and ``encode_infer`` for recent bodies, from memory."""

    def __init__(
        self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES, max_body: int = MAX_BODY
    ) -> None:
        self._entries: OrderedDict[MemoKey, MemoEntry] = OrderedDict()
        self._seen: set[int] = set()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.max_body = max_body
        self.bytes = 0
        self.hits = 0
        self._calls = 0  # bodies in this window
        self._recent = 0  # of them found
        self._cold = False  # few found lately: only one body in COLD_SAMPLE is looked up

    def __len__(self) -> int:
        return len(self._entries)

    def decode(
        self, body: bytes, header_length: str | None, model: str, version: int | None
    ) -> DecodedInfer:
        """``decode_infer(body, header_length, model, version)`` (an uncompressed body)."""
        self._calls += 1
        if self._calls >= WINDOW:
            self._turn()
        if self._cold and self._calls % COLD_SAMPLE:
            return decode_infer(body, header_length, model, version)
        end = _json_end(body, header_length)
        found = self._find(body, end, model, version) if end >= 0 else None
        if found is None:
            return decode_infer(body, header_length, model, version)
        key, request_id, entry = found
        if entry is not None:
            return self._recall(entry, request_id, model, version)
        decoded = decode_infer(body, header_length, model, version)
        # Not the request's id when the "id" found is nested (in parameters, say).
        if decoded.request.id == request_id and self._admit(key, body, end):
            request = decoded.request
            decoded.memo = MemoEntry(
                key,
                request.inputs,
                list(request.outputs) if request.outputs is not None else None,
                request.parameters,
                decoded.binary_default,
                dict(decoded.binary_outputs),
            )
        return decoded

    def _find(
        self, body: bytes, end: int, model: str, version: int | None
    ) -> tuple[MemoKey, str | None, MemoEntry | None] | None:
        """The body's key, the id in it and its entry if kept; None: not a body to keep."""
        exact: MemoKey = (body, end, -1, model, version)
        entry = self._entries.get(exact)
        if entry is not None:  # kept with no id in it: these very bytes
            return exact, None, entry
        span = _id_span(body, end)
        if span is None:
            return None
        start, close = span
        if start < 0:
            return exact, None, None
        request_id = _plain_id(body[start:close])
        if request_id is None:
            return None
        key = (body[:start] + body[close:], end - (close - start), start, model, version)
        return key, request_id, self._entries.get(key)

    def _admit(self, key: MemoKey, body: bytes, end: int) -> bool:
        """Whether to keep a body not kept yet: seen before, and with an unambiguous id."""
        seen = hash(key)
        if seen not in self._seen:
            if len(self._seen) >= SEEN:
                self._seen.clear()
            self._seen.add(seen)
            return False
        return key[2] < 0 or _unambiguous(body, end)

    def _recall(
        self, entry: MemoEntry, request_id: str | None, model: str, version: int | None
    ) -> DecodedInfer:
        self._entries.move_to_end(entry.key)
        self.hits += 1
        self._recent += 1
        request = InferenceRequest(
            model, entry.inputs, version, entry.outputs, request_id, entry.parameters
        )
        return DecodedInfer(request, entry.binary_default, entry.binary_outputs, entry)

    def _turn(self) -> None:
        """End of a window of bodies: cold when under 1 in 16 of them were found."""
        self._cold = self._recent * 16 < self._calls
        self._calls = self._recent = 0

    def encode(self, result: InferenceResult, decoded: DecodedInfer) -> tuple[bytes, int | None]:
        """``encode_infer(result, decoded)``."""
        entry = decoded.memo
        if entry is None:
            return encode_infer(result, decoded)
        answer = entry.answer
        if answer is not None and answer.fits(result):
            assert result.id is not None  # fits says so
            return answer.splice(result.id)
        payload, header = encode_infer(result, decoded)
        answer = Answer.of(result, payload, header)
        if answer is not None:
            self._keep(entry, answer)
        return payload, header

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()
        self.bytes = 0

    def _keep(self, entry: MemoEntry, answer: Answer) -> None:
        if entry.kept:
            self.bytes += answer.nbytes - (entry.answer.nbytes if entry.answer else 0)
            entry.answer = answer
            return
        entry.answer = answer
        size = _size(entry)
        if size > self._max_bytes:
            return
        for array in entry.inputs.values():
            array.flags.writeable = False  # shared by every request of this body from now on
        entries = self._entries
        previous = entries.pop(entry.key, None)
        if previous is not None:  # kept meanwhile by a concurrent request of the same body
            previous.kept = False
            self.bytes -= _size(previous)
        entries[entry.key] = entry
        entry.kept = True
        self.bytes += size
        while len(entries) > self._max_entries or self.bytes > self._max_bytes:
            _, oldest = entries.popitem(last=False)
            oldest.kept = False
            self.bytes -= _size(oldest)


def _named(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, Datatype], ...]:
    return tuple((spec.name, spec.datatype) for spec in specs)


def _size(entry: MemoEntry) -> int:
    inputs = sum(array.nbytes for array in entry.inputs.values())
    answer = entry.answer.nbytes if entry.answer is not None else 0
    return len(entry.key[0]) + inputs + answer + ENTRY_OVERHEAD


def _json_end(body: bytes, header_length: str | None) -> int:
    """Where the body's JSON ends; -1 when the header's length is not a plain number in it."""
    if header_length is None:
        return len(body)
    if header_length.isascii() and header_length.isdigit():
        end = int(header_length)
        return end if end <= len(body) else -1
    return -1


def _id_span(body: bytes, end: int) -> tuple[int, int] | None:
    """Where the first ``"id"`` key's string value starts and ends; (-1, -1): no ``"id"``.

    None when the first ``"id"`` is not a key followed by a string (a value, say):
    such a body is not kept.
    """
    i = body.find(b'"id"', 0, end)
    if i < 0:
        return -1, -1
    i += 4
    while i < end and body[i] in _WHITESPACE:
        i += 1
    if i >= end or body[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < end and body[i] in _WHITESPACE:
        i += 1
    if i >= end or body[i] != 0x22:  # '"'; else the id is not a string: decoding says so
        return None
    close = body.find(b'"', i + 1, end)
    return (i + 1, close) if close >= 0 else None


def _plain_id(raw: bytes) -> str | None:
    """The id a JSON string with these bytes holds, when they need no unescaping."""
    if b"\\" in raw or len(raw.translate(None, _CONTROL)) != len(raw):
        return None  # escapes, or control characters (invalid: decoding says so)
    try:
        request_id = raw.decode()
    except UnicodeDecodeError:
        return None
    return request_id if len(request_id) <= MAX_ID_CHARS else None


def _unambiguous(body: bytes, end: int) -> bool:
    """Whether the first ``"id"`` of this JSON can only be the request's id key.

    No backslash anywhere (so no escaped key spells ``id``) and ``"id"`` once.
    Checked once, when a body with an id is kept: a body found under its key
    later is this one with other characters in the id's string (which has no
    quote), so it has the same single ``"id"`` at the same place.
    """
    return body.find(b"\\", 0, end) < 0 and body.count(b'"id"', 0, end) == 1
