"""W3C trace context through the outbox, with OpenTelemetry when it is installed.

Publishing stores the current span's ``traceparent`` with the event; each turn runs in a
span that continues the producer's trace on the first attempt and links to it on
retries. Without ``opentelemetry-api`` installed nothing here imports it and every
function is a no-op: :func:`available` asks the import system whether the package exists
without importing it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

#: The tracer's name (instrumentation scope) of the turn spans.
TRACER_NAME = "spectral"


@cache
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ModuleNotFoundError:
        return False


def recording() -> bool:
    """Whether spans would be recorded: a tracer provider has been set (an SDK), not the
    API's default, whose spans are no-ops. Checked per turn, so a provider set after the
    worker started counts from then on."""
    if not available():
        return False
    import opentelemetry.trace as trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def current_traceparent() -> str | None:
    """The current span's context as a W3C ``traceparent`` value, or None (no
    OpenTelemetry, or no valid current span)."""
    if not available():
        return None
    import opentelemetry.trace as trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _parent_context(traceparent: str) -> Any:
    import opentelemetry.trace as trace

    _, trace_id, span_id, flags = traceparent.split("-")
    if int(trace_id, 16) == 0 or int(span_id, 16) == 0:
        return None
    return trace.SpanContext(
        trace_id=int(trace_id, 16), span_id=int(span_id, 16), is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16)),
    )


class TurnSpan:
    """The span of one turn, or nothing (:attr:`span` is None without OpenTelemetry)."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def outcome(self, kind: str) -> None:
        if self.span is not None:
            self.span.set_attribute("spectral.outcome", kind)


@contextmanager
def turn_span(
    *, event_id: int, topic: str, key: str | None, generation: int, attempt: int,
    traceparent: str | None,
) -> Iterator[TurnSpan]:
    """Run a turn in a span: the producer's trace continues on the first attempt (its
    span is the parent) and is linked from the retries (each retry is a trace of its own,
    so the producer's trace does not grow with every attempt)."""
    if not available():
        yield TurnSpan(None)
        return
    import opentelemetry.trace as trace

    parent = _parent_context(traceparent) if traceparent else None
    context = None
    links = []
    if parent is not None:
        if attempt == 1:
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        else:
            links.append(trace.Link(parent))
    attributes: dict[str, Any] = {
        "spectral.event_id": event_id, "spectral.topic": topic,
        "spectral.generation": generation, "spectral.attempt": attempt,
    }
    if key is not None:
        attributes["spectral.key"] = key
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"spectral turn {topic}", context=context, links=links, attributes=attributes,
        kind=trace.SpanKind.CONSUMER, record_exception=False, set_status_on_exception=False,
    ) as span:
        yield TurnSpan(span)
