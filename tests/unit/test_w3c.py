"""rpc_tasks.observability.w3c: the trace-context shortcut writes and reads exactly what
OpenTelemetry's default propagator does, and hands over to it whenever it cannot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.propagators.textmap import DefaultGetter, DefaultSetter, TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider

from rpc_tasks.observability import w3c

tracer = TracerProvider().get_tracer("test")


@pytest.fixture
def in_span() -> Iterator[trace.Span]:
    with tracer.start_as_current_span("parent") as span:
        yield span


def _library_inject() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def test_inject_writes_what_the_default_propagator_writes(in_span: trace.Span) -> None:
    carrier = w3c.inject()
    assert carrier == _library_inject()
    assert carrier["traceparent"].split("-")[2] == f"{in_span.get_span_context().span_id:016x}"


def test_inject_keeps_the_trace_state() -> None:
    parent = trace.SpanContext(
        0x1234,
        0x5678,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
        trace_state=trace.TraceState([("vendor", "value")]),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        carrier = w3c.inject()
        assert carrier == _library_inject()
        assert carrier["tracestate"] == "vendor=value"
    finally:
        context.detach(token)


def test_inject_without_a_span_is_empty() -> None:
    assert w3c.inject() == {} == _library_inject()


def test_baggage_goes_through_the_propagator(in_span: trace.Span) -> None:
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        carrier = w3c.inject()
    finally:
        context.detach(token)
    assert carrier["baggage"] == "tenant=acme"
    assert "traceparent" in carrier


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", "tracestate": "a=1,b=2"},
    ],
)
def test_extract_reads_what_the_default_propagator_reads(carrier: dict[str, str]) -> None:
    ours = trace.get_current_span(w3c.extract(carrier)).get_span_context()
    theirs = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    assert ours == theirs
    assert ours.is_remote and ours.is_valid
    assert ours.trace_state == theirs.trace_state


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},  # zero trace id
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},  # zero span id
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"},  # upper case
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},  # version ff
        {"traceparent": "garbage"},
    ],
)
def test_extract_of_an_invalid_parent_gives_no_valid_parent(carrier: dict[str, str]) -> None:
    extracted = w3c.extract(carrier)
    span_context = trace.get_current_span(extracted).get_span_context() if extracted is not None else None
    assert span_context is None or not span_context.is_valid
    assert not trace.get_current_span(propagate.extract(carrier)).get_span_context().is_valid


def test_extract_of_nothing_is_none() -> None:
    assert w3c.extract({}) is None


class _Marker(TextMapPropagator):
    """A propagator of its own header (stands for B3, Jaeger, ...)."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        (setter or DefaultSetter()).set(carrier, "x-marker", "1")

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return baggage.set_baggage("marker", (getter or DefaultGetter()).get(carrier, "x-marker"), context)

    @property
    def fields(self) -> set[str]:
        return {"x-marker"}


def test_another_global_propagator_is_used_as_configured(in_span: trace.Span) -> None:
    default = propagate.get_global_textmap()
    propagate.set_global_textmap(_Marker())
    try:
        assert w3c.inject() == {"x-marker": "1"}
        extracted = w3c.extract({"x-marker": "1"})
        assert baggage.get_baggage("marker", extracted) == ["1"]
    finally:
        propagate.set_global_textmap(default)
    assert "traceparent" in w3c.inject()
