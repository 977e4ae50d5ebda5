"""Spans for model executions, linked to the request spans each batch served.

A micro-batch serves many requests, so its span cannot be a child of all of
them: it carries one link per request instead (the OpenTelemetry pattern for
batch processing). Only the OpenTelemetry API is used here.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer
from opentelemetry.trace.status import Status, StatusCode


class BatchTracing:
    """Captures the caller's span at submit time and opens one span per execution."""

    def __init__(self, tracer: Tracer, model: str, version: int) -> None:
        self._tracer = tracer
        self._name = f"execute {model}"
        self._attributes = {"ml.model.name": model, "ml.model.version": str(version)}

    @staticmethod
    def capture() -> SpanContext | None:
        """The current request's span context, if it is a real (recorded or remote) span."""
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    def start(self, rows: int, callers: Sequence[SpanContext | None]) -> Span:
        links = [Link(context) for context in callers if context is not None]
        attributes: dict[str, str | int] = {
            **self._attributes,
            "ml.batch.rows": rows,
            "ml.batch.requests": len(callers),
        }
        return self._tracer.start_span(
            self._name, kind=SpanKind.INTERNAL, attributes=attributes, links=links
        )

    @staticmethod
    def end(span: Span, error: BaseException | None = None) -> None:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()
