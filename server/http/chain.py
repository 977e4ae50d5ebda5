"""The ASGI chain every request passes through, assembled here and only here.

Outermost first::

    ErrorGuard -> TelemetryMiddleware -> access layers -> HotRoutes -> Starlette router
                  (duration, spans)      (auth, rate     (POST .../infer
                                          limits)         straight from ASGI)

Every layer is a plain ASGI callable wrapping the next. The hot routes are
the innermost layer before the router, so anything added to the chain sees
the infer requests too: there is no path around it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import internal_error_response

log = logging.getLogger("sluice.http")

Layer = Callable[[ASGIApp], ASGIApp]


def build_chain(
    router: ASGIApp,
    *,
    telemetry: Layer | None = None,
    access: Sequence[Layer] = (),
    hot: Layer | None = None,
) -> ASGIApp:
    """Fold the layers around ``router`` in the one fixed order (absent ones are skipped)."""
    layers: list[Layer] = [ErrorGuard]
    if telemetry is not None:
        layers.append(telemetry)
    layers += access
    if hot is not None:
        layers.append(hot)
    app = router
    for layer in reversed(layers):
        app = layer(app)
    return app


class ResponseRecorder:
    """Forwards ``send`` and remembers the status and whether the answer is complete.

    One per request, made by the outermost layer; an inner layer that needs the
    status (telemetry) finds it as the ``send`` it is given instead of wrapping
    ``send`` again (see ``of``). Never stored in the scope: the scope, the
    server's ``send`` and this would form a cycle that only the garbage
    collector frees. A plain callable returning ``send``'s awaitable: a closure
    with an async wrapper costs a function, a cell and a coroutine per message.
    """

    __slots__ = ("finished", "send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0  # 0 until the answer starts
        self.finished = False

    def __call__(self, message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        return self.send(message)

    @classmethod
    def of(cls, send: Send) -> ResponseRecorder:
        """``send`` itself when an outer layer already records, else a recorder around it."""
        return send if isinstance(send, ResponseRecorder) else cls(send)


class ErrorGuard:
    """The outermost layer: an unexpected exception is logged once and answered with a 500.

    The answer is the V2 ``{"error": ...}`` body, never a traceback. When the
    answer had already started, the exception goes on to the server, which
    closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorder = ResponseRecorder.of(send)
        try:
            await self.app(scope, receive, recorder)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not recorder.status:
                await internal_error_response(exc)(scope, receive, send)
            elif not recorder.finished:
                raise
