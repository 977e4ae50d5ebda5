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


class _Progress:
    """Forwards ``send`` and remembers how far the answer got."""

    __slots__ = ("finished", "send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.finished = False

    def __call__(self, message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        return self.send(message)


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
        progress = _Progress(send)
        try:
            await self.app(scope, receive, progress)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not progress.started:
                await internal_error_response(exc)(scope, receive, send)
            elif not progress.finished:
                raise
