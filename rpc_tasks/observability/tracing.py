"""OpenTelemetry traces across ``.send()`` / ``.call()`` / ``call_many``, Dramatiq workers, the
Streams client and server, and WebSocket deliveries (``pip install rpc-tasks[otel]``).

Turned on explicitly: ``setup_broker(tracing=True)``, or :class:`TracingMiddleware` in
django-dramatiq's ``MIDDLEWARE`` (its constructor calls :func:`enable_tracing`), or
:func:`enable_tracing` for processes without a broker (a Streams client or server). Spans go to
whatever OpenTelemetry SDK the application configured; with only ``opentelemetry-api`` installed
(no SDK, no ``TracerProvider``) every hook returns at once. Nothing here is imported unless
asked for, so without ``opentelemetry`` there is no cost at all.

What is recorded (names and attributes are listed in ``docs/operating.md``):

* caller: a ``CLIENT`` span ``call <actor>`` around ``.call()`` (``call_many <actor>`` around a
  batch), a ``PRODUCER`` span ``send <actor>`` around ``.send()``; its W3C context goes into the
  Dramatiq message option ``rpc_trace`` (:data:`OPTION_TRACE`, injected in ``before_enqueue``);
* worker: a ``CONSUMER`` span ``process <actor>`` per attempt, child of the caller's span;
  attempts after the first link to the first one (its context travels in ``rpc_trace_first``);
  retries, postponements, cooldowns and give-ups are span events; a dead-lettered message gets
  a ``dead_letter <actor>`` span; a ``.call()`` skipped after its deadline a ``process`` span
  with the event ``expired_skipped``;
* Streams: ``call <method>`` (``CLIENT``; ``send <method>``, ``PRODUCER``, for a
  fire-and-forget request) on the client, ``serve <method>`` (``SERVER``) on
  :class:`~rpc_tasks.streams.server.RPCServer`, linked through the request's ``trace_context``
  extension; the WebSocket server's deliveries and fan-out acks are events of that span.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.middleware import Middleware

from .. import metrics, protocol
from ..exceptions import RPCConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "OPTION_TRACE",
    "OPTION_TRACE_FIRST",
    "TracingMiddleware",
    "disable_tracing",
    "enable_tracing",
    "install_tracing",
    "tracing_available",
]

#: Dramatiq message option: the caller's W3C trace context (``traceparent``, ``tracestate``).
OPTION_TRACE = "rpc_trace"
#: Dramatiq message option: the ``traceparent`` of the first attempt's span (later ones link to it).
OPTION_TRACE_FIRST = "rpc_trace_first"
#: ``rpc.system`` of every span.
RPC_SYSTEM = "rpc_tasks"
#: Events of :mod:`rpc_tasks.metrics` recorded as span events on the current span.
SPAN_EVENTS = frozenset(
    {
        "retry",
        "postpone",
        "cooldown_opened",
        "gave_up",
        "expired_skipped",
        "reply_push_failed",
        "ws_delivery",
        "ws_fanout_acks",
    }
)

_lock = threading.Lock()
_enabled = False
_tracer: Tracer | None = None
_provider: Any = None
_sdk_seen = False
_next_check = 0.0
#: The OpenTelemetry modules, loaded by :func:`enable_tracing` (no import statement per call).
_otel: Any = None


def tracing_available() -> bool:
    """True when ``opentelemetry-api`` is importable."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def enable_tracing(tracer_provider: Any = None) -> None:
    """Record spans for this process's calls, sends and served requests (idempotent).

    Spans go to ``tracer_provider``, by default OpenTelemetry's global one (whatever the
    application or its auto-instrumentation configured, also later).

    Raises :class:`~rpc_tasks.exceptions.RPCConfigurationError` when OpenTelemetry is not
    installed. The Dramatiq side also needs :class:`TracingMiddleware` on the broker
    (:func:`install_tracing`, or ``setup_broker(tracing=True)``)."""
    global _enabled, _tracer, _provider, _otel, _sdk_seen, _next_check
    if not tracing_available():
        raise RPCConfigurationError("tracing needs OpenTelemetry: pip install 'rpc-tasks[otel]'")
    with _lock:
        if _enabled and (tracer_provider is None or tracer_provider is _provider):
            return
        from opentelemetry import context, propagate, trace

        from .. import __version__
        from . import w3c

        _otel = types.SimpleNamespace(trace=trace, propagate=propagate, context=context, w3c=w3c)
        _provider = tracer_provider
        _tracer = trace.get_tracer("rpc_tasks", __version__, tracer_provider=tracer_provider)
        _sdk_seen, _next_check = False, 0.0
        _enabled = True
    metrics.add_scope_factory(_scope_factory)
    metrics.add_listener(_on_event, operations=False)
    metrics.set_trace_injector(_inject_current)


def disable_tracing() -> None:
    """Undo :func:`enable_tracing` (the middleware stays on brokers but records nothing)."""
    global _enabled
    with _lock:
        _enabled = False
    metrics.remove_scope_factory(_scope_factory)
    metrics.remove_listener(_on_event)
    metrics.set_trace_injector(None)


def install_tracing(broker: dramatiq.Broker) -> dramatiq.Broker:
    """Add :class:`TracingMiddleware` to ``broker`` (idempotent), right after ``RPCReplies``
    (so an expired ``.call()`` is recorded as skipped and postponements land in the span)."""
    if any(isinstance(m, TracingMiddleware) for m in broker.middleware):
        return broker
    middleware = TracingMiddleware()
    from ..middleware import RPCReplies

    index = next((i for i, m in enumerate(broker.middleware) if isinstance(m, RPCReplies)), None)
    if index is not None and index + 1 < len(broker.middleware):
        broker.add_middleware(middleware, before=type(broker.middleware[index + 1]))
    else:
        broker.add_middleware(middleware)
    return broker


# -- helpers -----------------------------------------------------------------------------------


def _recording() -> Tracer | None:
    """The tracer, when tracing is on and an SDK ``TracerProvider`` is configured. Without one
    (only the API answers), the global provider is looked at again at most once a second: this
    runs several times per call, and the API's lookup reads the environment each time."""
    global _sdk_seen, _next_check
    if not _enabled:
        return None
    if _sdk_seen:
        return _tracer
    now = time.monotonic()
    if now < _next_check:
        return None
    provider = _provider if _provider is not None else _otel.trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        _next_check = now + 1.0
        return None
    _sdk_seen = True
    return _tracer


def _extract(carrier: Any) -> Any:
    if isinstance(carrier, Mapping) and carrier:
        return _otel.w3c.extract(carrier)
    return None


def _traceparent(span: Span) -> str:
    """``span``'s W3C ``traceparent`` (kept in a message to link later attempts to it)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _inject_current() -> dict[str, str] | None:
    if _recording() is None:
        return None
    return _otel.w3c.inject() or None


def _link_to(traceparent: Any) -> list[Any]:
    """A link to the span a ``traceparent`` names (none if it is malformed)."""
    parts = traceparent.split("-") if isinstance(traceparent, str) else []
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return []
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return []
    t = _otel.trace
    span_context = t.SpanContext(trace_id, span_id, is_remote=True, trace_flags=t.TraceFlags(flags & 0xFF))
    return [t.Link(span_context)] if span_context.is_valid else []


def _on_event(event: str, labels: Mapping[str, Any]) -> None:
    if event not in SPAN_EVENTS or _recording() is None:
        return
    span = _otel.trace.get_current_span()
    if span.is_recording():
        attributes = {
            f"rpc_tasks.{k}": v
            for k, v in labels.items()
            if isinstance(v, (str, bool, int, float)) and k != "actor"
        }
        span.add_event(event, attributes)


class _SpanScope:
    """A span made current for one observed operation (see :func:`rpc_tasks.metrics.observe`)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.token = _otel.context.attach(_otel.trace.set_span_in_context(span))

    def finish(self, outcome: str, error: BaseException | None, duration: float) -> None:
        _finish_span(self.span, outcome, error)
        _otel.context.detach(self.token)


def _finish_span(span: Span, outcome: str, error: BaseException | None) -> None:
    # Success is the absence of an outcome (each attribute costs the SDK a few microseconds).
    if outcome != metrics.OUTCOME_OK:
        span.set_attribute("rpc_tasks.outcome", outcome)
        span.set_attribute("error.type", outcome)
        if error is not None:
            span.record_exception(error)
        if outcome != "skipped":  # a postponement is not a failure
            span.set_status(_otel.trace.Status(_otel.trace.StatusCode.ERROR, outcome))
    span.end()


def _scope_factory(kind: str, labels: Mapping[str, Any]) -> _SpanScope | None:
    tracer = _recording()
    if tracer is None:
        return None
    SpanKind = _otel.trace.SpanKind
    attributes: dict[str, Any] = {"rpc.system": RPC_SYSTEM}
    if kind == "serve":
        method = str(labels.get("method", ""))
        attributes.update({"rpc.method": method, "rpc.service": str(labels.get("stream", ""))})
        span = tracer.start_span(
            f"serve {method}",
            context=_extract(labels.get("trace_context")),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        return _SpanScope(span)
    actor = str(labels.get("actor", ""))
    if kind == "stream_call":
        attributes["rpc.method"] = actor
        span = tracer.start_span(f"call {actor}", kind=SpanKind.CLIENT, attributes=attributes)
        return _SpanScope(span)
    if kind == "stream_send":  # a Streams fire-and-forget request
        attributes["rpc.method"] = actor
        span = tracer.start_span(f"send {actor}", kind=SpanKind.PRODUCER, attributes=attributes)
        return _SpanScope(span)
    if kind not in ("call", "call_many", "send"):
        return None
    # Messaging conventions only (the actor is the span name's second word): each attribute
    # costs the SDK a few microseconds per span, on every call.
    span = tracer.start_span(
        f"{kind} {actor}",
        kind=SpanKind.PRODUCER if kind == "send" else SpanKind.CLIENT,
        attributes={
            "messaging.system": "dramatiq",
            "messaging.destination.name": str(labels.get("queue", "")),
            "messaging.operation.type": "send",
            "messaging.operation.name": kind,
        },
    )
    return _SpanScope(span)


# -- Dramatiq middleware -----------------------------------------------------------------------


class TracingMiddleware(Middleware):
    """Carries trace context in Dramatiq messages and records a span per worker attempt.

    * ``before_enqueue`` (caller, and a worker re-enqueueing a retry/postponement): puts the
      current trace context in the message option ``rpc_trace`` unless it already has one, so
      every attempt stays a child of the original caller's span;
    * ``before_process_message``: starts ``process <actor>`` (``CONSUMER``) as a child of that
      context, linked to the first attempt's span, and makes it current for the actor's code;
    * ``after_process_message`` / ``after_skip_message``: ends it with the outcome;
    * ``after_nack``: a ``dead_letter <actor>`` span (the message failed for good).

    Building one enables tracing for the process (:func:`enable_tracing`), so a dotted path in
    django-dramatiq's ``MIDDLEWARE`` is enough.
    """

    def __init__(self) -> None:
        enable_tracing()
        self._local = threading.local()

    def _spans(self) -> dict[str, tuple[Span, object]]:
        spans: dict[str, tuple[Span, object]] | None = getattr(self._local, "spans", None)
        if spans is None:
            spans = self._local.spans = {}
        return spans

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        options = message.options
        running: dict[str, tuple[Span, object]] | None = getattr(self._local, "spans", None)
        if running and OPTION_TRACE_FIRST not in options:
            # A worker re-enqueueing the message it runs (retry, postponement): later attempts
            # link to this first one. Written here rather than on every attempt's start.
            entry = running.get(message.message_id)
            if entry is not None:
                options[OPTION_TRACE_FIRST] = _traceparent(entry[0])
        if OPTION_TRACE in options or _recording() is None:
            return
        carrier = _otel.w3c.inject()
        if carrier:
            options[OPTION_TRACE] = carrier

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        tracer = _recording()
        if tracer is None:
            return
        span = self._start(tracer, message, "process")
        token = _otel.context.attach(_otel.trace.set_span_in_context(span))
        self._spans()[message.message_id] = (span, token)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        entry = self._spans().pop(message.message_id, None)
        if entry is None:
            return
        span, token = entry
        if message.failed:
            span.set_attribute("rpc_tasks.gave_up", True)
        outcome = metrics.OUTCOME_OK if exception is None else metrics.outcome_of(exception)
        self._end(span, token, outcome, exception)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        entry = self._spans().pop(message.message_id, None)
        if entry is not None:
            self._end(entry[0], entry[1], "skipped", None)
            return
        tracer = _recording()
        if tracer is not None:  # skipped before this middleware ran (RPCReplies: deadline passed)
            expired = protocol.deadline_passed(message.options.get(protocol.OPTION_DEADLINE))
            span = self._start(tracer, message, "process")
            span.add_event("expired_skipped" if expired else "skipped")
            _finish_span(span, "expired" if expired else "skipped", None)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        tracer = _recording()
        if tracer is not None:
            _finish_span(self._start(tracer, message, "dead_letter"), "dead_lettered", None)

    def _start(self, tracer: Tracer, message: Any, operation: str) -> Span:
        attempt = message.options.get(protocol.OPTION_ATTEMPT, 0)
        attributes = {
            "messaging.system": "dramatiq",
            "messaging.destination.name": str(message.queue_name),
            "messaging.message.id": str(message.message_id),
            "messaging.operation.type": "process" if operation == "process" else "settle",
            "messaging.operation.name": operation,
            # OPTION_ATTEMPT counts started attempts: the one starting now is the next.
            "rpc_tasks.attempt": (attempt if isinstance(attempt, int) else 0) + (operation == "process"),
        }
        return tracer.start_span(
            f"{operation} {message.actor_name}",
            context=_extract(message.options.get(OPTION_TRACE)),
            kind=_otel.trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=_link_to(message.options.get(OPTION_TRACE_FIRST)),
        )

    def _end(self, span: Span, token: object, outcome: str, error: BaseException | None) -> None:
        _finish_span(span, outcome, error)
        _otel.context.detach(token)
