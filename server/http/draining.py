"""Stopping without resetting a request: uvicorn's graceful shutdown, minus its two races.

uvicorn (0.54) stops by closing its listeners and then every idle
connection. Both reset requests that a client has already sent:

- closing a listening socket resets the connections still in its accept
  queue: the client's ``connect()`` had succeeded and its request was on its
  way;
- an "idle" keep-alive connection is one whose last answer is complete and
  whose next request the event loop has not read yet, which under load is
  often already in the socket's receive buffer (closing a socket with unread
  data sends RST) or on the wire.

``DrainingServer`` stops instead in this order:

1. new connection attempts are dropped at the listener (a socket filter that
   drops bare SYNs): a client retransmits its SYN after a second and then
   meets a closed port, a refusal before anything was sent;
2. the accept queue is served: handshakes under way complete, and the event
   loop accepts every connection the kernel took;
3. the listeners close; every answer from now on carries ``Connection: close``,
   and a connection ends after it;
4. a connection that stays between requests for ``IDLE_CLOSE_S`` with nothing
   unread in its socket is closed; a client that sends nothing for that long
   is not about to.

Steps 1 and 2 use Linux socket options; where they fail, the listeners simply
close (uvicorn's behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import socket
import struct
import termios
from typing import Any

import uvicorn

from server.http.protocol import GuardedHttpProtocol

log = logging.getLogger("sluice.http")

IDLE_CLOSE_S = 1.0
TICK_S = 0.1
# Handshakes under way when SYNs start being dropped complete within a round trip.
HANDSHAKE_S = 0.05
ACCEPT_QUEUE_S = 1.0  # at most, for the event loop to accept what the kernel queued
QUEUE_POLL_S = 0.005

SO_ATTACH_FILTER = 26  # Linux, every architecture (asm-generic/socket.h)
# Classic BPF over the TCP header: drop a segment with SYN set and ACK clear (a new
# connection attempt), keep everything else (handshakes completing, other segments).
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]             TCP flags
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN, drop, keep
    (0x06, 0, 0, 0),  # drop: ret #0
    (0x06, 0, 0, 0xFFFFFFFF),  # keep: ret #-1 (the whole segment)
)
_TCPI_UNACKED = 24  # offset in struct tcp_info; on a listener: its accept queue's length


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown answers every request a client got to send."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = [s for server in self.servers for s in server.sockets]
        await _stop_accepting(listeners)
        state = self.server_state
        # The main loop no longer refreshes the default headers once it has stopped.
        state.default_headers = [*state.default_headers, (b"connection", b"close")]
        closer = asyncio.ensure_future(_close_idle(state.connections))
        try:
            await super().shutdown(sockets)
        finally:
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer


async def _stop_accepting(listeners: list[Any]) -> None:
    """Steps 1 and 2: no new connection attempt is taken, every one the kernel took is."""
    held = [socket.fromfd(s.fileno(), s.family, s.type) for s in listeners]
    try:
        for sock in held:
            _drop_syns(sock)
        await asyncio.sleep(HANDSHAKE_S)
        # The kernel's queue has no event to wait on: polled, the loop accepting meanwhile.
        for _ in range(round(ACCEPT_QUEUE_S / QUEUE_POLL_S)):
            if not any(_accept_queue(sock) for sock in held):
                break
            await asyncio.sleep(QUEUE_POLL_S)
    finally:
        for sock in held:
            sock.close()  # a duplicate descriptor: the listener itself stays open


def _drop_syns(sock: socket.socket) -> None:
    program = b"".join(struct.pack("HBBI", *op) for op in _DROP_SYN)
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(_DROP_SYN), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        # Then connections keep arriving until the listener closes; the last may be reset.
        log.warning("cannot hold off new connections on %s: %s", sock.getsockname(), exc)


def _accept_queue(sock: socket.socket) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


async def _close_idle(connections: set[Any]) -> None:
    """Step 4, until cancelled: uvicorn waits for the connections to be gone."""
    loop = asyncio.get_running_loop()
    since: dict[Any, float] = {}
    while True:
        now = loop.time()
        since = {c: t for c, t in since.items() if c in connections}
        for connection in list(connections):
            if not isinstance(connection, GuardedHttpProtocol):
                continue
            transport = connection.transport
            if transport.is_closing():
                continue
            if not connection.between_requests or _unread(transport):
                since.pop(connection, None)
            elif now - since.setdefault(connection, now) >= IDLE_CLOSE_S:
                transport.close()
        await asyncio.sleep(TICK_S)


def _unread(transport: asyncio.Transport) -> bool:
    """Bytes in the socket that the event loop has not read yet (a request arriving)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return bool(struct.unpack("i", raw)[0])
