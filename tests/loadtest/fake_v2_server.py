"""A small V2-like HTTP server whose behaviour is chosen by the model name.

Run as a script (it prints ``PORT <n>`` once listening). Model names:

- ``fixed``: answers at once.
- ``delay_<ms>``: every request waits ``ms`` (concurrently).
- ``serial_<ms>``: requests are served one at a time, ``ms`` each.
- ``stall_<ms>_at_<n>``: the n-th request starts a stall of ``ms`` that every
  request arriving before it ends also waits out.
- ``status_<code>_every_<k>``: every k-th request gets ``code``.
- ``echo``, ``mixed``, ``named``: decode the request (JSON or binary) and send
  the inputs back as outputs of the same names.
- ``chunked``: answers with chunked transfer encoding.
- ``closing``: answers with ``Connection: close`` and closes.
- ``drop``: closes the connection instead of answering.
- ``garbage``: answers with bytes that are not HTTP.
- ``missing``: metadata answers 404.

The decoder here is deliberately separate from the load generator's encoder:
tests use it as the oracle for what a V2 server would parse.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson

DTYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
MIXED_INPUTS = [
    {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
    {"name": "b", "datatype": "INT64", "shape": [-1, 2]},
    {"name": "c", "datatype": "BOOL", "shape": [-1, 1]},
    {"name": "d", "datatype": "FP16", "shape": [-1, 2]},
    {"name": "e", "datatype": "BYTES", "shape": [-1, 1]},
]
DEFAULT_INPUTS = [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
NAMED_INPUTS = [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
SCORE = orjson.dumps(
    {
        "model_name": "m",
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [1], "data": [0.5]}],
    }
)


def decode_request(body: bytes, header_length: int | None) -> dict[str, np.ndarray[Any, Any]]:
    """The input tensors a V2 server would read from this body."""
    header = body if header_length is None else body[:header_length]
    binary = b"" if header_length is None else body[header_length:]
    doc = orjson.loads(header)
    tensors = {}
    offset = 0
    for spec in doc["inputs"]:
        shape = tuple(spec["shape"])
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = spec["data"]
            if spec["datatype"] == "BYTES":
                array = np.array([s.encode() for s in data], dtype=object)
            else:
                array = np.array(data, dtype=DTYPES[spec["datatype"]])
        else:
            raw = binary[offset : offset + size]
            offset += size
            if spec["datatype"] == "BYTES":
                items, pos = [], 0
                while pos < len(raw):
                    (n,) = struct.unpack_from("<I", raw, pos)
                    items.append(raw[pos + 4 : pos + 4 + n])
                    pos += 4 + n
                array = np.array(items, dtype=object)
            else:
                array = np.frombuffer(raw, dtype=DTYPES[spec["datatype"]])
        tensors[spec["name"]] = array.reshape(shape)
    if offset != len(binary):
        raise ValueError("binary section not fully consumed")
    return tensors


def echo(body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
    doc = orjson.loads(body if header_length is None else body[:header_length])
    binary_out = bool((doc.get("parameters") or {}).get("binary_data_output"))
    tensors = decode_request(body, header_length)
    outputs, chunks = [], []
    for spec in doc["inputs"]:
        array = tensors[spec["name"]]
        out: dict[str, Any] = {
            "name": spec["name"],
            "datatype": spec["datatype"],
            "shape": list(array.shape),
        }
        if binary_out and spec["datatype"] != "BYTES":
            raw = np.ascontiguousarray(array).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif spec["datatype"] == "BYTES":
            out["data"] = [v.decode() for v in array.reshape(-1)]
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    head = orjson.dumps({"model_name": "echo", "outputs": outputs})
    if chunks:
        return head + b"".join(chunks), len(head)
    return head, None


class Behaviour:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.stall_until: dict[str, float] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def infer(
        self, model: str, body: bytes, header_length: int | None
    ) -> tuple[int, bytes, int | None]:
        self.counts[model] += 1
        count = self.counts[model]
        kind, *args = model.split("_")
        if kind == "delay":
            await asyncio.sleep(int(args[0]) / 1000)
        elif kind == "serial":
            lock = self.locks.setdefault(model, asyncio.Lock())
            async with lock:
                await asyncio.sleep(int(args[0]) / 1000)
        elif kind == "stall":
            if count == int(args[2]):
                self.stall_until[model] = time.monotonic() + int(args[0]) / 1000
            wait = self.stall_until.get(model, 0.0) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        elif kind == "status" and count % int(args[2]) == 0:
            return int(args[0]), b'{"error": "unavailable"}', None
        elif kind in ("echo", "mixed", "named"):
            try:
                payload, split = echo(body, header_length)
            except (ValueError, KeyError) as exc:
                return 400, orjson.dumps({"error": str(exc)}), None
            return 200, payload, split
        return 200, SCORE, None


def metadata(model: str) -> tuple[int, bytes]:
    if model == "missing":
        return 404, b'{"error": "unknown model"}'
    inputs = {"mixed": MIXED_INPUTS, "named": NAMED_INPUTS}.get(model, DEFAULT_INPUTS)
    doc = {
        "name": model,
        "platform": "fake",
        "inputs": inputs,
        "outputs": inputs
        if model in ("echo", "mixed", "named")
        else [{"name": "score", "datatype": "FP32", "shape": [-1]}],
    }
    return 200, orjson.dumps(doc)


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, behaviour: Behaviour
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ")
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            parts = path.strip("/").split("/")
            split = None
            if method == "GET" and len(parts) == 4 and parts[3] == "config":
                if parts[2] == "named":
                    status, payload = (
                        200,
                        orjson.dumps(
                            {
                                "name": "named",
                                "parameters": {"feature_names": {"string_value": "c,a,b"}},
                            }
                        ),
                    )
                else:
                    status, payload = 404, b'{"error": "no config"}'
            elif method == "GET" and len(parts) == 3:
                status, payload = metadata(parts[2])
            elif method == "POST" and parts[2:] == ["drop", "infer"]:
                break
            elif method == "POST" and parts[2:] == ["garbage", "infer"]:
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                continue
            elif method == "POST" and len(parts) == 4 and parts[3] == "infer":
                ihcl = headers.get("inference-header-content-length")
                status, payload, split = await behaviour.infer(
                    parts[2], body, int(ihcl) if ihcl else None
                )
            else:
                status, payload = 404, b'{"error": "no route"}'
            model = parts[2] if len(parts) > 2 else ""
            extra = f"Inference-Header-Content-Length: {split}\r\n" if split is not None else ""
            if model == "closing":
                extra += "Connection: close\r\n"
            if model == "chunked" and method == "POST":
                mid = len(payload) // 2
                framed = (
                    b"".join(
                        f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n"
                        for p in (payload[:mid], payload[mid:])
                    )
                    + b"0\r\nX-Trailer: 1\r\n\r\n"
                )
                writer.write(
                    f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n{extra}\r\n".encode()
                    + framed
                )
            else:
                status_line = (
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n{extra}\r\n"
                )
                writer.write(status_line.encode() + payload)
            if model == "closing":
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    behaviour = Behaviour()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, behaviour), "127.0.0.1", 0, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
