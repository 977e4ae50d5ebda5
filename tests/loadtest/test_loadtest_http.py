"""The response parser, fed byte by byte: framing, chunking, and what counts as an error."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest import ErrorKind
from loadtest.http import Connection


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class Handler:
    def __init__(self) -> None:
        self.responses: list[tuple[int, bytes | None, int]] = []
        self.closed: list[ErrorKind | None] = []

    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        self.responses.append((status, body, split))

    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        self.closed.append(kind)


def connection(keep_body: bool = True) -> tuple[Connection, Handler, Transport]:
    handler, transport = Handler(), Transport()
    conn = Connection(handler, keep_body)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.send(b"POST / HTTP/1.1\r\n\r\n")
    return conn, handler, transport


def feed(conn: Connection, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        conn.data_received(data[i : i + step])


LENGTH = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b'inference-header-content-length: 7\r\nContent-Length: 11\r\n\r\n{"a": 1}xyz'
)
CHUNKED = (
    b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
@pytest.mark.parametrize(
    ("response", "expected"),
    [(LENGTH, (200, b'{"a": 1}xyz', 7)), (CHUNKED, (503, b"abcdefg", -1))],
)
def test_responses_parse_however_they_are_split(
    response: bytes, expected: tuple[int, bytes, int], step: int
) -> None:
    conn, handler, _ = connection()

    feed(conn, response, step)

    assert handler.responses == [expected]
    assert not conn.busy
    assert conn.is_open


def test_bodies_are_not_kept_unless_asked() -> None:
    conn, handler, _ = connection(keep_body=False)
    feed(conn, LENGTH, 5)
    assert handler.responses == [(200, None, 7)]


def test_connection_close_stops_reuse_before_the_handler_runs() -> None:
    conn, handler, transport = connection()
    seen: list[Any] = []
    handler.on_response = lambda c, *_: seen.append(c.is_open)  # type: ignore[method-assign]

    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")

    assert seen == [False]
    assert transport.closed


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabEXTRA",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    ],
)
def test_malformed_responses_are_parse_errors(garbage: bytes) -> None:
    conn, handler, transport = connection()

    conn.data_received(garbage)
    conn.connection_lost(None)

    assert transport.aborted
    assert handler.responses == []
    assert handler.closed == [ErrorKind.PARSE_ERROR]


def test_a_connection_lost_mid_response_is_a_reset() -> None:
    conn, handler, _ = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.eof_received()
    conn.connection_lost(None)
    assert handler.closed == [ErrorKind.RESET]


def test_an_idle_connection_closing_loses_no_request() -> None:
    conn, handler, _ = connection()
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    conn.eof_received()
    conn.connection_lost(None)
    assert handler.responses == [(204, b"", -1)]
    assert handler.closed == [None]
