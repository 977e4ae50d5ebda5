"""The edge's own answers to requests it refuses before the app runs, built once.

Every refusal has the ``{"error": ...}`` body of every other error: as bytes
written straight to the socket (``raw_response``, and the prebuilt 503 of
``Refusals.overloaded_bytes``), or as a tiny ASGI app answering one request in
uvicorn's own cycle (``ErrorApp``), when a cycle has already begun.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

BUSY = "the server is answering too many requests; retry shortly"


def raw_response(
    status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = (), close: bool = True
) -> bytes:
    """A complete ``{"error": ...}`` answer, as bytes; it closes the connection unless not
    ``close``."""
    body = orjson.dumps({"error": message})
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
    ]
    if close:
        head.append(b"connection: close\r\n")
    head += [name + b": " + value + b"\r\n" for name, value in extra]
    return b"".join([*head, b"\r\n", body])


class ErrorApp:
    """An ASGI app that answers ``{"error": message}`` with ``status`` and ``extra`` headers."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        self.status = status
        self.body = orjson.dumps({"error": message})
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *extra,
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


@dataclass(frozen=True, slots=True)
class Refusals:
    """The answers of one server's limits; the same objects for all its connections."""

    head_message: str  # 431: the request line and headers past the limit
    head_too_large: ErrorApp
    overloaded: ErrorApp  # 503 + Retry-After; the connection stays open
    overloaded_bytes: bytes  # the same, written straight to the socket


@functools.cache
def refusals(retry_after_s: int, max_header_bytes: int) -> Refusals:
    """The answers for these limits (built once: connections are made per request burst)."""
    head = f"request line and headers exceed {max_header_bytes} bytes"
    retry = ((b"retry-after", str(retry_after_s).encode()),)
    return Refusals(
        head,
        ErrorApp(431, head, ((b"connection", b"close"),)),
        ErrorApp(503, BUSY, retry),
        raw_response(503, BUSY, retry, close=False),
    )
