"""uvicorn's httptools protocol with the limits a server facing the internet needs.

uvicorn (0.54, httptools) caps none of these, and each was a defect found by
a hostile client:

- connections: at ``max_connections`` an idle connection (no request in
  progress) is closed to make room for the new one, else the new one gets a
  503 and is closed, so probes keep working while idle sockets pile up;
- the request line and headers: ``max_header_bytes`` (else 431) and
  ``header_timeout_s`` from the connection or the request's first byte (else
  408), which also closes connections that never send anything;
- the body: ``body_timeout_s`` once the headers are in (a body that never
  ends, or a Content-Length it never reaches, gets a 408);
- requests being answered at once: at most ``max_concurrent_requests``, and
  fewer while they take longer than ``target_latency_s`` in the server
  (``server.http.overload``), then a 503 with ``Retry-After`` before the app
  runs (health is exempt);
- body bytes held by all requests in progress: at most ``body_budget``
  (a flood of large bodies, each within the per-request limit, would
  otherwise hold connections x limit bytes); the body that would pass it
  gets a 503 with ``Retry-After`` and its connection is closed;
- uvicorn's own 400 for unparseable requests is plain text: here it is the
  ``{"error": ...}`` body every other refusal has.

Deadlines cost a float store per request phase, not a timer: one sweep a
second walks the connections and cuts off those past their deadline (the
timeouts are seconds long; a second of slack is fine).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from server.http.overload import SHED
from server.http.refusals import raw_response, refusals
from server.http.sweeper import Sweeper

log = logging.getLogger("sluice.http")

# A request that arrives whole in one read smaller than this is not counted in the body
# budget: what those hold is bounded by max_concurrent_requests x this (64 MiB at the
# defaults), and counting it would cost every small request.
WHOLE_BYTES = 64 * 1024
_HEALTH = b"/v2/health/"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits every connection of one server process is held to."""

    max_connections: int
    max_concurrent_requests: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    retry_after_s: int = 1
    target_latency_s: float | None = 0.01  # None: a fixed limit
    body_budget: int = 256 * 1024 * 1024


_BASE = HttpToolsProtocol
_SWEEPERS: weakref.WeakKeyDictionary[ServerState, Sweeper] = weakref.WeakKeyDictionary()


class GuardedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus ``ConnectionLimits``; pass it as uvicorn's ``http``."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        sweeper = _SWEEPERS.get(server_state)
        if sweeper is None:
            sweeper = _SWEEPERS[server_state] = Sweeper(self.connections, self.loop, limits)
        self._sweeper = sweeper
        self._limit = sweeper.limit
        self._started = 0.0  # when the current request's headers were in; 0: not measured
        # Requests of this connection let in and not answered yet (more than one when
        # pipelined), in the limit's count of requests in progress.
        self._active = 0
        self._refused = False  # the current request was refused without a cycle
        self._refusals = refusals(limits.retry_after_s, limits.max_header_bytes)
        # Read on every request: kept on the instance, one attribute lookup instead of two.
        self._header_timeout_s = limits.header_timeout_s
        self._body_timeout_s = limits.body_timeout_s
        self._body_budget = limits.body_budget
        self._head_bytes = 0
        self._max_head = limits.max_header_bytes
        # A read that may hold the end of a head past the limit: the head is measured when
        # it completes (a whole head in one read is never counted in ``_head_bytes``).
        self._check_head = False
        self._body_bytes = 0  # of this connection's request in progress, in the budget
        self._parsed = 0  # messages completed on this connection
        # Reading a request line and headers (or waiting for one); else its body: the phase
        # whose deadline is armed.
        self._in_head = True
        self._deadline = 0.0  # 0: none; else monotonic time the current phase must end by

    # -- connections -----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_idle():
            log.warning("connection limit (%d) reached: refusing", self.limits.max_connections)
            self._refuse(503, f"too many connections (limit {self.limits.max_connections})")
            return
        self._deadline = time.monotonic() + self._header_timeout_s
        self._sweeper.ensure()

    def connection_lost(self, exc: Exception | None) -> None:
        active = self._active
        if active:  # let in, never answered
            self._active = 0
            self._limit.active -= active
        if self._body_bytes:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # Its app may still hold the body (decoding, queued): charged until it returns.
                self._sweeper.hold(cycle, self._body_bytes)
                self._body_bytes = 0
            else:
                self._release_body()
        _BASE.connection_lost(self, exc)

    def _evict_idle(self) -> bool:
        # A walk of the connections, only while the server is full.
        for other in self.connections:
            if other is not self and isinstance(other, GuardedHttpProtocol) and other.idle:
                other.transport.close()
                return True
        return False

    @property
    def idle(self) -> bool:
        """No request is being answered: waiting between requests, or still sending headers.

        A client that is still sending its headers when the server is full is slow or
        hostile (slowloris); closing it costs an honest client one retry at most.
        """
        cycle = self.cycle
        return self._in_head and (cycle is None or cycle.response_complete)

    # -- graceful shutdown -------------------------------------------------------

    @property
    def between_requests(self) -> bool:
        """Idle, and no byte of a next request parsed: what a stopping server may close."""
        return self.idle and not self._head_bytes and not self.pipeline

    def shutdown(self) -> None:
        """The server stops (uvicorn calls this once per connection).

        uvicorn's own closes every idle connection at once, resetting any request whose
        bytes are on the wire or unread in the socket. Here the request being answered
        says ``Connection: close`` if its head has not gone out yet; nothing is closed: a
        connection ends after an answer that says so, or when the server's drain
        (``server.http.draining``) finds it still between requests a while later.
        """
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False

    # -- phases and their deadlines --------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the sweep: cut the connection off when its phase ran out of time."""
        if not self._deadline or now < self._deadline or self.transport.is_closing():
            return
        if self._in_head:
            phase, timeout = "request headers", self._header_timeout_s
        else:
            phase, timeout = "request body", self._body_timeout_s
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # an answer is under way: nothing more can be said
            return
        self._refuse(408, f"{phase} not received within {timeout:g} s")

    def _refuse(
        self, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        self._deadline = 0.0
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True  # the app's own answer, if any, is not sent after this
            cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(raw_response(status, message, extra))
            self.transport.close()

    # -- parsing ---------------------------------------------------------------

    # Each override calls the base class directly (not super()) and reads the clock at
    # most once: these run for every request, on the loop.

    def data_received(self, data: bytes) -> None:
        seen = self._parsed
        if not self._deadline:
            # A keep-alive connection's next request: its headers' deadline starts now (the
            # first request's ran from the connection), on the sweeper's clock: a tick old
            # at most (a sweep without an adaptive limit), well within the sweep's slack.
            self._deadline = self._sweeper.now + self._header_timeout_s
        if self._in_head and self._head_bytes + len(data) > self._max_head:
            self._check_head = True  # the head may complete in this very read: measured then
        _BASE.data_received(self, data)
        if seen == self._parsed:
            if self._in_head:
                if not self.transport.is_closing():
                    # Counted once the chunk is parsed, and only if it completed no message
                    # and left no body in progress: httptools holds one chunk more at most.
                    self._head_bytes += len(data)
                    if self._head_bytes > self._max_head:
                        self._refuse(431, self._refusals.head_message)
                return
        elif len(data) < WHOLE_BYTES:
            return  # a whole small request in one read: not counted (see WHOLE_BYTES)
        # Body bytes, held by the request in progress until its answer is complete.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            size = len(data)
            self._body_bytes += size
            sweeper = self._sweeper
            sweeper.body_bytes += size
            if sweeper.body_bytes > self._body_budget:
                self._over_budget()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._check_head:
            self._check_head = False
            if _head_size(self.url, self.headers) > self._max_head:
                self._started = 0.0
                self._answer_with(self._refusals.head_too_large)
                return
        now = time.monotonic()
        self._deadline = now + self._body_timeout_s
        limit = self._limit
        # Requests let in and not yet answered (not uvicorn's tasks, which outlive their
        # answers: 64 closed-loop clients would count as more than 64).
        in_progress = limit.active
        if in_progress < limit.fewest:  # AdaptiveLimit.started, inlined
            limit.fewest = in_progress
        if in_progress < limit.limit or self.url.startswith(_HEALTH):
            limit.active = in_progress + 1
            self._active += 1
            self._started = now
            _BASE.on_headers_complete(self)
            return
        self._started = 0.0
        limit.refused += 1
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.parser.should_keep_alive():
            # The cheapest refusal: the answer written at once, no task, no cycle; the body
            # that follows is dropped by the base class (its cycle is complete), and the
            # connection stays open for the client's retry.
            self.transport.write(self._refusals.overloaded_bytes)  # the body deadline still holds
            self._refused = True
            return
        # Otherwise (a connection's first request, pipelining): uvicorn's limit_concurrency
        # in our answer's shape, the app slot swapped for this one request.
        self._answer_with(self._refusals.overloaded)

    def _answer_with(self, app: Any) -> None:
        """This one request answered by ``app`` in uvicorn's own cycle, not by the server's."""
        served, self.app = self.app, app
        try:
            _BASE.on_headers_complete(self)
        finally:
            self.app = served

    def _over_budget(self) -> None:
        self._sweeper.body_refusals += 1
        self._release_body()
        if self.cycle.response_started:
            self.transport.close()  # an answer is under way: nothing more can be said
            return
        self._refuse(
            503,
            "the server holds too many request bodies; retry shortly",
            ((b"retry-after", str(self.limits.retry_after_s).encode()),),
        )

    def _release_body(self) -> None:
        held = self._body_bytes
        if held:
            self._body_bytes = 0
            self._sweeper.body_bytes -= held

    def on_message_complete(self) -> None:
        self._parsed += 1
        self._in_head = True
        self._deadline = 0.0
        _BASE.on_message_complete(self)
        if self._refused:
            # Answered at once, without a cycle: what uvicorn does once an answer is
            # complete, the idle keep-alive timer, is done here.
            self._refused = False
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        held = self._body_bytes
        if held:
            self._body_bytes = 0
            self._sweeper.body_bytes -= held
        if self._active:
            self._active -= 1
            limit = self._limit
            limit.active -= 1
            started = self._started
            if started:
                self._started = 0.0
                if SHED in self.cycle.scope:  # refused by the model's queue, not answered
                    limit.shed += 1
                else:
                    limit.total_s += time.monotonic() - started  # AdaptiveLimit.finished
                    limit.count += 1
        _BASE.on_response_complete(self)

    def send_400_response(self, msg: str) -> None:
        self._deadline = 0.0
        if not self.transport.is_closing():
            self.transport.write(raw_response(400, "the request is not valid HTTP/1.1"))
            self.transport.close()


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a parsed request line and headers, as sent (method and version aside)."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers) + 16
