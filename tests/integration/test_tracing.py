"""Trace context through the outbox with the OpenTelemetry SDK's in-memory exporter: the
producer's span is stored with the event, the first turn continues its trace, a retry
links to it, and a follow-up published by a handler carries the turn's context."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import spectral
from spectral.db import Store

from .test_publish import allocate, with_conn
from .test_worker_turns import running, wait_until

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process: this module owns it.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    yield _EXPORTER


def _hex(span_context: trace.SpanContext) -> tuple[str, str]:
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"


def _traceparent(span_context: trace.SpanContext) -> str:
    trace_id, span_id = _hex(span_context)
    return f"00-{trace_id}-{span_id}-{int(span_context.trace_flags):02x}"


def test_publish_stores_the_current_spans_traceparent(
    db_url: str, exporter: InMemorySpanExporter,
) -> None:
    allocate(db_url)
    tracer = trace.get_tracer("producer")

    async def body(conn: asyncpg.Connection) -> tuple[str, str | None]:
        with tracer.start_as_current_span("place order") as span:
            event_id = await spectral.publish(conn, "order.paid", {})
            explicit = await spectral.publish(
                conn, "order.paid", {},
                traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        stored = await conn.fetchval("SELECT traceparent FROM core.outbox WHERE id = $1", event_id)
        other = await conn.fetchval("SELECT traceparent FROM core.outbox WHERE id = $1", explicit)
        assert other == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        return stored, _traceparent(span.get_span_context())

    stored, expected = with_conn(db_url, body)
    assert stored == expected


async def test_the_first_turn_continues_the_trace_and_a_retry_links_to_it(
    store: Store, exporter: InMemorySpanExporter,
) -> None:
    exporter.clear()
    producer_trace, producer_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    app = spectral.App(service="t")
    follow_ups: list[int] = []

    @app.handler("order.paid", name="charge")
    async def charge(event: spectral.Event, tx: spectral.Tx) -> None:
        if event.attempt == 1:
            raise RuntimeError("card declined, retry")
        follow_ups.append(await tx.publish("order.charged", {}, key=event.key))

    gen = int((await store.allocate_generation("t", None, None))["generation"])
    event_id = await store.publish(
        "order.paid", json.dumps({}), generation=gen,
        extras=spectral.events.publish_extras(
            "order-9", None, f"00-{producer_trace}-{producer_span}-01"),
    )
    async with running(app, store, gen):
        await wait_until(lambda: _done(store, event_id), 10)
    turns = [s for s in exporter.get_finished_spans() if s.name == "spectral turn order.paid"]
    assert [s.attributes["spectral.attempt"] for s in turns] == [1, 2]
    first, retry = turns
    assert dict(first.attributes) == {
        "spectral.event_id": event_id, "spectral.topic": "order.paid", "spectral.key": "order-9",
        "spectral.generation": gen, "spectral.attempt": 1, "spectral.outcome": "fail"}
    assert retry.attributes["spectral.outcome"] == "ack"
    # Attempt 1 is a child of the producer's span, in its trace.
    assert _hex(first.context)[0] == producer_trace
    assert first.parent is not None and _hex(first.parent) == (producer_trace, producer_span)
    # The retry is a trace of its own, linked to the producer's span.
    assert _hex(retry.context)[0] != producer_trace and retry.parent is None
    assert [_hex(link.context) for link in retry.links] == [(producer_trace, producer_span)]
    # The follow-up carries the retry turn's context.
    [follow_up] = follow_ups
    row = await store.get_event(follow_up)
    assert row is not None and row["traceparent"] == _traceparent(retry.context)
    assert row["key"] == "order-9"


async def _done(store: Store, event_id: int) -> bool:
    row = await store.get_event(event_id)
    return row is not None and row["status"] == "DONE"


_WITHOUT_OTEL = r"""
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Refuse())
import spectral, spectral.turns, spectral.tracing
from spectral.events import publish_extras
assert spectral.tracing.available() is False
assert publish_extras("k").traceparent is None
with spectral.tracing.turn_span(event_id=1, topic="a", key=None, generation=1, attempt=1,
                                traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01") as span:
    span.outcome("ack")
assert span.span is None
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
print("loaded:", loaded)
"""


def test_without_opentelemetry_nothing_is_imported_and_nothing_changes() -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_OTEL], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


def test_with_opentelemetry_importable_the_check_does_not_import_it() -> None:
    code = ("import sys, spectral.tracing as t; assert t.available();"
            " print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # find_spec of a submodule imports its parent package only, never the API itself.
    assert "opentelemetry.trace" not in result.stdout



_RECORDING = """
import spectral.tracing as t
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
assert t.available()
print(t.recording())
trace.set_tracer_provider(TracerProvider())
print(t.recording())
"""


def test_spans_record_only_once_a_tracer_provider_is_set() -> None:
    # A process of its own: the global provider can be set once per process.
    result = subprocess.run([sys.executable, "-c", _RECORDING], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
