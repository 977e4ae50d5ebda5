"""Coverage-guided fuzzing of the V2 codec with atheris (libFuzzer).

    python tests/security/fuzz_codec.py [libFuzzer options] [CORPUS_DIR ...]
    python tests/security/fuzz_codec.py -max_total_time=3600 /tmp/codec-corpus   # on demand

The first byte of an input chooses the body's encoding (plain, gzip,
deflate) and whether the next two bytes are a claimed JSON header length
(binary tensors follow the header); the rest is the body. The only exception the codec may raise is
``InvalidInput`` (a 400); anything else, a crash or a hang, is a finding.
With ``--seed-corpus DIR`` it writes a few valid requests to start from.
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["server.http.codec"]):
    from server.errors import InvalidInput
    from server.http.codec import decode_infer, decompress

LIMIT = 1024 * 1024


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    header_length = None
    if mode & 0x4 and len(body) >= 2:
        # A claimed JSON header length, true or not: the codec must not trust it.
        header_length = str(struct.unpack_from("<H", body)[0])
        body = body[2:]
    encoding = (None, "gzip", "deflate")[mode % 3]
    if encoding == "gzip":
        body = gzip.compress(body, compresslevel=1)
    elif encoding == "deflate":
        body = zlib.compress(body, 1)
    try:
        plain = decompress(body, encoding, LIMIT)
        decoded = decode_infer(plain, header_length, "m", None)
    except InvalidInput:
        return
    for array in decoded.request.inputs.values():
        assert array.size >= 0


def seed_corpus(folder: Path) -> None:
    """A few valid requests: JSON of each datatype, nested data, binary tensors."""
    import orjson

    folder.mkdir(parents=True, exist_ok=True)

    def tensor(datatype: str, data: object, shape: list[int]) -> dict[str, object]:
        return {"name": "x", "datatype": datatype, "shape": shape, "data": data}

    documents = [
        {"inputs": [tensor("FP32", [0.5, 1.0, -2.0, 3.5], [1, 4])], "id": "a"},
        {"inputs": [tensor("INT64", [[1, 2], [3, 4]], [2, 2])]},
        {"inputs": [tensor("BOOL", [True, False], [2])]},
        {"inputs": [tensor("BYTES", ["a", "bc"], [2])], "outputs": [{"name": "y"}]},
        {"inputs": [tensor("FP64", [0.1, None], [2])], "parameters": {"timeout": 1000}},
    ]
    for index, doc in enumerate(documents):
        (folder / f"json-{index}").write_bytes(b"\x00" + orjson.dumps(doc))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    )
    payload = header + struct.pack("<2f", 1.0, 2.0)
    # Mode 4: a plain body after two bytes of claimed header length (the truth here).
    (folder / "binary").write_bytes(b"\x04" + struct.pack("<H", len(header)) + payload)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        seed_corpus(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
