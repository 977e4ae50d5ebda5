"""A minimal HTTP/1.1 keep-alive client connection, one request in flight at a time.

The load generator's hot loop lives here, so the parser handles only what a
response to our own requests can contain: a status line, ``Content-Length`` or
chunked framing, ``Connection: close``, and the binary-tensor header. Requests
are complete pre-encoded byte strings; sending one is a single
``transport.write``.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import IntEnum, StrEnum
from typing import Protocol, cast

MAX_HEAD_BYTES = 64 * 1024


class ErrorKind(StrEnum):
    """Transport failures, counted by kind."""

    CONNECT_REFUSED = "connect_refused"
    CONNECT_ERROR = "connect_error"
    RESET = "reset"
    TIMEOUT = "timeout"
    PARSE_ERROR = "parse_error"


class ResponseHandler(Protocol):
    """Who a connection reports to; runners implement it."""

    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        """A complete response; ``split`` is its ``Inference-Header-Content-Length`` or -1."""

    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        """The connection is gone; ``kind`` is set when a request was lost with it."""


class _State(IntEnum):
    HEAD = 0
    BODY = 1
    CHUNK_SIZE = 2
    CHUNK_DATA = 3
    CHUNK_CRLF = 4
    TRAILERS = 5
    UNTIL_CLOSE = 6


class Connection(asyncio.Protocol):
    """One client connection. ``started``/``sent``/``tag`` belong to the runner."""

    __slots__ = (
        "_buf",
        "_close_after",
        "_fail_kind",
        "_need",
        "_parts",
        "_split",
        "_state",
        "_status",
        "busy",
        "handler",
        "is_open",
        "keep_body",
        "sent",
        "started",
        "tag",
        "transport",
    )

    def __init__(self, handler: ResponseHandler, keep_body: bool = False) -> None:
        self.handler = handler
        self.keep_body = keep_body
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.busy = False
        self.started = 0.0
        self.sent = 0.0
        self.tag = 0
        self._buf = b""
        self._state = _State.HEAD
        self._need = 0
        self._status = 0
        self._split = -1
        self._close_after = False
        self._parts: list[bytes] = []
        self._fail_kind: ErrorKind | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.is_open = True

    def send(self, request: bytes) -> None:
        """Write one complete request; the caller must wait for its response first."""
        self.busy = True
        assert self.transport is not None
        self.transport.write(request)

    def abort(self, kind: ErrorKind) -> None:
        """Drop the connection, charging the outstanding request (if any) to ``kind``."""
        if self._fail_kind is None and self.busy:
            self._fail_kind = kind
        self.is_open = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.is_open = False
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        if self._state == _State.UNTIL_CLOSE and self.busy:
            self._complete(b"".join(self._parts))
        elif self.busy and self._fail_kind is None:
            self._fail_kind = ErrorKind.RESET
        self.is_open = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        kind = self._fail_kind
        if kind is None and self.busy:
            kind = ErrorKind.RESET
        self.busy = False
        self.handler.on_closed(self, kind)

    def _fail(self, kind: ErrorKind) -> None:
        self.abort(kind)

    def _complete(self, body: bytes | None) -> None:
        self.busy = False
        self._state = _State.HEAD
        self._parts = []
        if self._close_after:
            # The server will close; nobody may write another request on this one.
            self.is_open = False
        self.handler.on_response(self, self._status, body, self._split)
        if self._close_after and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        rest: bytes | None = data
        while rest:
            state = self._state
            if state == _State.HEAD:
                rest = self._parse_head(rest)
            elif state == _State.BODY:
                rest = self._take_body(rest)
            elif state == _State.UNTIL_CLOSE:
                if self.keep_body:
                    self._parts.append(rest)
                rest = None
            elif state == _State.CHUNK_SIZE:
                rest = self._chunk_size(rest)
            elif state == _State.CHUNK_DATA:
                rest = self._chunk_data(rest)
            elif state == _State.CHUNK_CRLF:
                rest = self._chunk_crlf(rest)
            else:
                rest = self._trailers(rest)

    def _take_body(self, data: bytes) -> bytes | None:
        need = self._need
        if len(data) < need:
            self._need = need - len(data)
            if self.keep_body:
                self._parts.append(data)
            return None
        if len(data) > need:
            # We never pipeline, so bytes past the response are garbage.
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        if self.keep_body:
            self._parts.append(data)
            self._complete(b"".join(self._parts))
        else:
            self._complete(None)
        return None

    def _parse_head(self, data: bytes) -> bytes | None:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                self._fail(ErrorKind.PARSE_ERROR)
            else:
                self._buf = data
            return None
        if not self.busy or not data.startswith(b"HTTP/1."):
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        head = data[:end].lower()
        try:
            status = int(head[9:12])
        except ValueError:
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        if 100 <= status < 200:
            return data[end + 4 :]
        self._status = status
        connection = _header(head, b"\r\nconnection:")
        self._close_after = b"close" in connection or head.startswith(b"http/1.0")
        self._split = _header_int(head, b"\r\ninference-header-content-length:")
        data = data[end + 4 :]
        if b"chunked" in _header(head, b"\r\ntransfer-encoding:"):
            self._state = _State.CHUNK_SIZE
            return data
        length = _header_int(head, b"\r\ncontent-length:")
        if length > 0:
            self._state = _State.BODY
            self._need = length
            return data
        if length == 0 or status in (204, 304):
            if data:
                self._fail(ErrorKind.PARSE_ERROR)
                return None
            self._complete(b"" if self.keep_body else None)
            return None
        if length < -1:
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        self._state = _State.UNTIL_CLOSE
        self._close_after = True
        return data

    def _chunk_size(self, data: bytes) -> bytes | None:
        eol = data.find(b"\r\n")
        if eol < 0:
            self._buf = data
            return None
        try:
            size = int(data[:eol].split(b";", 1)[0].strip(), 16)
        except ValueError:
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        self._state = _State.CHUNK_DATA if size else _State.TRAILERS
        self._need = size
        return data[eol + 2 :]

    def _chunk_data(self, data: bytes) -> bytes | None:
        need = self._need
        piece = data[:need]
        if self.keep_body:
            self._parts.append(piece)
        self._need = need - len(piece)
        if self._need:
            return None
        self._state = _State.CHUNK_CRLF
        return data[need:]

    def _chunk_crlf(self, data: bytes) -> bytes | None:
        if len(data) < 2:
            self._buf = data
            return None
        if data[:2] != b"\r\n":
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        self._state = _State.CHUNK_SIZE
        return data[2:]

    def _trailers(self, data: bytes) -> bytes | None:
        # Either an empty line right away, or trailer lines ended by an empty one.
        if data.startswith(b"\r\n"):
            rest = data[2:]
        else:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return None
            rest = data[end + 4 :]
        if rest:
            self._fail(ErrorKind.PARSE_ERROR)
            return None
        self._complete(b"".join(self._parts) if self.keep_body else None)
        return None


def _header(head: bytes, name: bytes) -> bytes:
    """Value of a header in a lower-cased head (``name`` starts with CRLF); empty if absent."""
    start = head.find(name)
    if start < 0:
        return b""
    start += len(name)
    end = head.find(b"\r\n", start)
    return head[start:] if end < 0 else head[start:end]


def _header_int(head: bytes, name: bytes) -> int:
    """Value of an integer header; -1 when absent, -2 when malformed."""
    value = _header(head, name)
    if not value:
        return -1
    try:
        number = int(value)
    except ValueError:
        return -2
    return number if number >= 0 else -2


def connect_error_kind(exc: OSError) -> ErrorKind:
    """Refused is told apart from every other connect failure."""
    if isinstance(exc, ConnectionRefusedError):
        return ErrorKind.CONNECT_REFUSED
    return ErrorKind.CONNECT_ERROR


class _OneShot:
    """Handler for a single request/response, used outside the hot loop."""

    def __init__(self) -> None:
        self.future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        if not self.future.done():
            self.future.set_result((status, body or b""))
        conn.close()

    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        if not self.future.done():
            reason = kind.value if kind else "closed"
            self.future.set_exception(ConnectionError(f"connection lost ({reason})"))


async def request_once(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    """Send one request on a fresh connection; returns status and body.

    Raises ``OSError`` (connect failures, lost connections); bound it with
    ``asyncio.timeout``.
    """
    loop = asyncio.get_running_loop()
    handler = _OneShot()
    _, conn = await loop.create_connection(lambda: Connection(handler, True), host, port)
    conn.send(request)
    try:
        return await handler.future
    finally:
        with contextlib.suppress(Exception):
            conn.close()
