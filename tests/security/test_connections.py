"""A real ``sluice serve`` against clients that misbehave at the connection level.

Short limits (set through SLUICE_LIMITS__*) so the server's own clock cuts the
misbehaving clients off; each read below waits for that, bounded.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from security_support import Served, serve

LIMITS = {
    "SLUICE_LIMITS__HEADER_TIMEOUT_S": "1",
    "SLUICE_LIMITS__BODY_TIMEOUT_S": "1",
    "SLUICE_LIMITS__KEEP_ALIVE_TIMEOUT_S": "1",
    "SLUICE_LIMITS__MAX_CONNECTIONS": "16",
    "SLUICE_LIMITS__MAX_CONCURRENT_REQUESTS": "3",
    "SLUICE_LIMITS__MAX_HEADER_BYTES": "8192",
}
BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.5] * 4}]}
)
READ_S = 30  # far longer than any limit above: a hang fails the test instead of stalling it


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = serve(tiny_repo, tmp_path_factory.mktemp("log") / "server.log", env=LIMITS)
    yield running
    running.stop()


def connect(server: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=READ_S)


def send(sock: socket.socket, data: bytes) -> None:
    # The server may refuse before it has read everything: its answer is what counts.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, orjson.loads(body)


def exchange(server: Served, data: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    with connect(server) as sock:
        send(sock, data)
        return answer(read_all(sock))


def test_garbage_gets_a_json_400(server: Served) -> None:
    status, headers, body = exchange(server, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert body == {"error": "the request is not valid HTTP/1.1"}


def test_oversized_headers_get_431_without_reading_them_all(server: Served) -> None:
    huge = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (4 * 1024 * 1024)
    status, _, body = exchange(server, huge + b"\r\n\r\n")
    assert status == 431
    assert body["error"] == "request line and headers exceed 8192 bytes"


def test_oversized_headers_arriving_whole_in_one_read_get_431(server: Served) -> None:
    # 12 KiB: one write, one read on loopback, so the head completes in the read that
    # crosses the limit (it used to pass unmeasured); with a body after it, too.
    pad = b"X-Pad: " + b"a" * (12 * 1024) + b"\r\n"
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"
    body = b'{"inputs": []}'
    post = (
        b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\n"
        + pad
        + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    for request in (get, post):
        status, headers, answered = exchange(server, request)
        assert status == 431
        assert headers["connection"] == "close"
        assert answered["error"] == "request line and headers exceed 8192 bytes"


def test_headers_just_under_the_limit_are_served(server: Served) -> None:
    pad = b"X-Pad: " + b"a" * (7 * 1024) + b"\r\n"
    status, _, body = exchange(
        server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + pad + b"connection: close\r\n\r\n"
    )
    assert (status, body) == (200, {"live": True})


def test_headers_that_never_end_get_408(server: Served) -> None:
    status, _, body = exchange(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    assert status == 408
    assert body["error"] == "request headers not received within 1 s"


def test_a_connection_that_sends_nothing_is_closed(server: Served) -> None:
    with connect(server) as sock:
        status, _, _ = answer(read_all(sock))
    assert status == 408


def test_a_body_shorter_than_its_content_length_gets_408(server: Served) -> None:
    head = b"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    status, _, body = exchange(server, head + b"ab")
    assert status == 408
    assert body["error"] == "request body not received within 1 s"


def test_a_chunked_body_that_never_ends_gets_408(server: Served) -> None:
    head = b"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, _ = exchange(server, head + b"5\r\nhello\r\n")
    assert status == 408


def test_an_idle_keep_alive_connection_is_closed(server: Served) -> None:
    with connect(server) as sock:
        send(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_all(sock)  # returns only once the server closes the idle connection
    assert raw.startswith(b"HTTP/1.1 200")


def test_probes_are_served_while_idle_sockets_fill_every_slot(server: Served) -> None:
    idle = [connect(server) for _ in range(40)]  # more than max_connections (16)
    try:
        probe = httpx.get(f"{server.url}/v2/health/ready", timeout=READ_S)
        infer = httpx.post(f"{server.url}/v2/models/tree/infer", content=BODY, timeout=READ_S)
    finally:
        for sock in idle:
            sock.close()
    assert probe.status_code == 200
    assert infer.status_code == 200


def test_slowloris_does_not_lock_out_a_normal_client(server: Served) -> None:
    slow = [connect(server) for _ in range(40)]
    try:
        for sock in slow:
            send(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        infer = httpx.post(f"{server.url}/v2/models/tree/infer", content=BODY, timeout=READ_S)
    finally:
        for sock in slow:
            sock.close()
    assert infer.status_code == 200


def test_beyond_the_concurrent_request_limit_the_answer_is_503_at_once(server: Served) -> None:
    # Three requests in progress (their bodies not sent yet) fill max_concurrent_requests.
    head = b"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    holders = [connect(server) for _ in range(3)]
    try:
        for sock in holders:
            send(sock, head)
        # A served request proves the three are in progress, not still being accepted.
        refused = _until_refused(server)
        probe = httpx.get(f"{server.url}/v2/health/ready", timeout=READ_S)
    finally:
        for sock in holders:
            sock.close()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "too many requests" in refused.json()["error"]
    assert probe.status_code == 200, "health is exempt from the limit"


def test_a_refused_keep_alive_client_can_go_on_on_the_same_connection(server: Served) -> None:
    head = b"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    infer = b"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(BODY),
        BODY,
    )
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    holders = [connect(server) for _ in range(3)]
    try:
        for sock in holders:
            send(sock, head)
        with connect(server) as sock:
            send(sock, probe)
            assert _one_answer(sock).startswith(b"HTTP/1.1 200")
            statuses = []
            for _ in range(200):  # until the holders' requests are in progress (bounded)
                send(sock, infer)
                answer = _one_answer(sock)
                statuses.append(answer.split(b" ", 2)[1])
                if statuses[-1] == b"503":
                    break
            assert statuses[-1] == b"503", statuses
            assert b"retry-after: 1" in answer
            # Its body was dropped and the parser is in step: the next request is answered.
            send(sock, probe)
            assert _one_answer(sock).startswith(b"HTTP/1.1 200")
            # Refused and then idle: closed after the keep-alive timeout like any other.
            send(sock, infer)
            rest = read_all(sock)
            assert rest.startswith(b"HTTP/1.1 503"), rest[:100]
    finally:
        for holder in holders:
            holder.close()


def _one_answer(sock: socket.socket) -> bytes:
    """One response on a keep-alive connection (its Content-Length says where it ends)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def _until_refused(server: Served) -> httpx.Response:
    # The holders' requests start when the server has parsed their headers; until then a
    # request may still get in. Bounded: the holders time out after 1 s anyway.
    for _ in range(200):
        response = httpx.post(f"{server.url}/v2/models/tree/infer", content=BODY, timeout=READ_S)
        if response.status_code == 503:
            return response
    raise AssertionError("the concurrent-request limit never refused a request")


def test_a_large_body_in_big_chunks_is_not_taken_for_headers(server: Served) -> None:
    """Body bytes never count against max_header_bytes, however the reads fall."""
    rows = [[0.5, -1.0, 2.0, 0.1]] * 20_000  # ~400 KB of JSON, far over the 8 KiB header limit
    body = orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [20_000, 4], "data": rows}]}
    )
    head = f"POST /v2/models/tree/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    with connect(server) as sock:
        send(sock, head.encode() + b"Connection: close\r\n\r\n" + body)
        raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
