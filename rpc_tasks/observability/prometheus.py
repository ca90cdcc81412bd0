"""Prometheus metrics for callers, workers, Streams servers and the WebSocket server
(``pip install rpc-tasks[prometheus]``).

:func:`enable_metrics` turns the events of :mod:`rpc_tasks.metrics` into ``prometheus_client``
series (every name is listed in :data:`METRICS` and in ``docs/operating.md``). The metric
objects are created on the first event, not when this module is imported: in a Dramatiq worker
Dramatiq's own ``dramatiq.middleware.prometheus.Prometheus`` sets ``PROMETHEUS_MULTIPROC_DIR``
when the worker process boots, and ``prometheus_client`` picks its storage (files in that
folder, or process memory) when it is first imported. So worker metrics land in the same
multi-process folder as Dramatiq's and its exposition server (port ``dramatiq_prom_port``,
default 9191) shows both. Outside a Dramatiq worker they go to ``prometheus_client.REGISTRY``
(or, with ``PROMETHEUS_MULTIPROC_DIR`` set, to that folder), exposed by
:func:`start_metrics_server` (``rpc-tasks serve --metrics-port``, ``rpc-tasks ws
--metrics-port``) or your own ``/metrics`` view (:func:`metrics_text`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Mapping
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from .. import metrics
from ..exceptions import RPCConfigurationError
from .deferred import FlushOnCollect, updates

__all__ = [
    "METRICS",
    "RPCMetrics",
    "RPCMetricsMiddleware",
    "disable_metrics",
    "enable_metrics",
    "flush_metrics",
    "install_metrics",
    "metrics_text",
    "start_metrics_server",
]

#: Every series: name -> (type, labels, help).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "rpc_tasks_call_duration_seconds": (
        "histogram",
        ("actor", "kind", "outcome"),
        "Caller-side latency of .call() / call_many() / a Streams call (kind), by outcome",
    ),
    "rpc_tasks_calls_in_flight": ("gauge", ("actor", "kind"), "Calls waiting for their reply"),
    "rpc_tasks_sends_total": ("counter", ("actor", "outcome"), ".send() enqueues by outcome"),
    "rpc_tasks_worker_attempts_total": ("counter", ("actor", "queue"), "Messages a worker started"),
    "rpc_tasks_worker_retries_total": ("counter", ("actor", "code"), "Attempts scheduled again"),
    "rpc_tasks_worker_postponements_total": (
        "counter",
        ("actor", "reason"),
        "Messages put back without running (cooldown, rate_limit)",
    ),
    "rpc_tasks_worker_cooldowns_opened_total": ("counter", ("actor",), "Shared cooldowns opened"),
    "rpc_tasks_worker_expired_skipped_total": (
        "counter",
        ("actor",),
        ".call() messages skipped: the caller's deadline had passed",
    ),
    "rpc_tasks_worker_gave_up_total": ("counter", ("actor", "reason"), "Messages that failed for good"),
    "rpc_tasks_worker_dead_lettered_total": ("counter", ("actor", "queue"), "Messages dead-lettered"),
    "rpc_tasks_worker_reply_push_failures_total": (
        "counter",
        ("actor",),
        "Replies a worker could not push to the caller",
    ),
    "rpc_tasks_server_requests_total": (
        "counter",
        ("method", "outcome"),
        "Streams requests served, by outcome (ok or the error code)",
    ),
    "rpc_tasks_server_request_duration_seconds": (
        "histogram",
        ("method",),
        "Streams request handling: handler, reply and ack",
    ),
    "rpc_tasks_server_dead_lettered_total": (
        "counter",
        ("stream",),
        "Stream entries moved to the dead-letter stream (unparseable, redelivered too often, trimmed)",
    ),
    "rpc_tasks_server_requests_in_flight": ("gauge", ("method",), "Streams requests being handled"),
    "rpc_tasks_server_pending": ("gauge", ("stream", "group"), "Entries delivered but not acked"),
    "rpc_tasks_server_unread": ("gauge", ("stream", "group"), "Entries not yet read by the group"),
    "rpc_tasks_ws_connections": ("gauge", ("instance",), "Open WebSocket connections"),
    "rpc_tasks_ws_frames_offered_total": ("counter", ("instance",), "Frames offered to sockets"),
    "rpc_tasks_ws_frames_delivered_total": (
        "counter",
        ("instance",),
        "Frames a socket took within the delivery timeout",
    ),
    "rpc_tasks_ws_fanout_acks_expected_total": (
        "counter",
        ("instance",),
        "Acks expected from other instances (fan-out)",
    ),
    "rpc_tasks_ws_fanout_acks_received_total": (
        "counter",
        ("instance",),
        "Acks received from other instances (fan-out)",
    ),
    "rpc_tasks_ws_rate_limited_frames_total": (
        "counter",
        ("instance",),
        "Browser frames refused by the per-connection rate limit",
    ),
}

#: Latency buckets (seconds) of both histograms.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_WORKER_COUNTERS = {
    "cooldown_opened": "rpc_tasks_worker_cooldowns_opened",
    "expired_skipped": "rpc_tasks_worker_expired_skipped",
    "reply_push_failed": "rpc_tasks_worker_reply_push_failures",
}
_CALLER_KINDS = frozenset({"call", "call_many", "stream_call"})
_lock = threading.Lock()
_enabled = False
_metrics: RPCMetrics | None = None


def metrics_available() -> bool:
    """True when ``prometheus_client`` is importable."""
    try:  # find_spec: importing it here would be too early in a Dramatiq worker (module docstring)
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        return False


class RPCMetrics:
    """The ``prometheus_client`` objects (one per entry of :data:`METRICS`) in ``registry``."""

    def __init__(self, registry: Any) -> None:
        import prometheus_client as prom

        self.registry = registry
        registry.register(FlushOnCollect())  # first: a collect sees every queued update
        self.series: dict[str, Any] = {}
        for name, (kind, labels, doc) in METRICS.items():
            if kind == "histogram":
                self.series[name] = prom.Histogram(name, doc, labels, buckets=BUCKETS, registry=registry)
            elif kind == "gauge":
                backlog = name.startswith("rpc_tasks_server_") and "flight" not in name
                mode: Any = "livemax" if backlog else "livesum"
                self.series[name] = prom.Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)
            else:
                self.series[name.removesuffix("_total")] = prom.Counter(
                    name.removesuffix("_total"), doc, labels, registry=registry
                )
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def child(self, name: str, *labels: str) -> Any:
        """The series ``name`` (without ``_total``) with these label values (cached)."""
        key = (name, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = self.series[name].labels(*labels)
        return found


def _get() -> RPCMetrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                import prometheus_client as prom

                multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
                # In multi-process mode values live in files; a private registry avoids
                # registering twice in the default one (which is not what gets scraped then).
                _metrics = RPCMetrics(prom.CollectorRegistry() if multiprocess else prom.REGISTRY)
    return _metrics


def enable_metrics() -> None:
    """Export rpc-tasks events of this process as Prometheus metrics (idempotent). Raises
    :class:`~rpc_tasks.exceptions.RPCConfigurationError` without ``prometheus_client``."""
    global _enabled
    if not metrics_available():
        raise RPCConfigurationError("metrics need prometheus_client: pip install 'rpc-tasks[prometheus]'")
    with _lock:
        if _enabled:
            return
        _enabled = True
    metrics.add_listener(_on_event, operations=False)
    metrics.add_scope_factory(_scope)


def flush_metrics() -> None:
    """Apply this process's queued metric updates now (they are otherwise applied within
    :data:`~rpc_tasks.observability.deferred.FLUSH_INTERVAL` seconds, at a scrape through
    rpc-tasks' exposition, at a worker's shutdown and at exit): e.g. before reading the series
    with ``prometheus_client`` yourself."""
    updates.flush()


def disable_metrics() -> None:
    """Stop updating the metrics (the series stay registered)."""
    global _enabled
    with _lock:
        _enabled = False
    metrics.remove_listener(_on_event)
    metrics.remove_scope_factory(_scope)


def _registry_for_exposition() -> Any:
    import prometheus_client as prom

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = prom.CollectorRegistry()
        registry.register(FlushOnCollect())  # this process's queued updates go to its files first
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return _get().registry


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Enable the metrics and serve ``/metrics`` on ``addr:port`` from a daemon thread (port 0
    picks a free one). Returns the port."""
    import prometheus_client as prom

    enable_metrics()
    server, _thread = prom.start_http_server(port, addr, registry=_registry_for_exposition())
    return int(server.server_port)


def metrics_text() -> tuple[bytes, str]:
    """``(body, content type)`` of a scrape of this process's metrics (all processes' with
    ``PROMETHEUS_MULTIPROC_DIR``), for a ``/metrics`` view of your web framework."""
    import prometheus_client as prom

    return prom.generate_latest(_registry_for_exposition()), prom.CONTENT_TYPE_LATEST


class _OperationScope:
    """One observed operation: its in-flight gauge now, its latency (and outcome) at the end
    (queued updates: :mod:`rpc_tasks.observability.deferred` says why)."""

    __slots__ = ("actor", "gauge", "kind")

    def __init__(self, kind: str, actor: str, gauge: Any) -> None:
        self.kind, self.actor, self.gauge = kind, actor, gauge
        updates.inc(gauge)

    def finish(self, outcome: str, error: BaseException | None, duration: float) -> None:
        updates.inc(self.gauge, -1)
        m = _get()
        if self.kind == "serve":
            updates.inc(m.child("rpc_tasks_server_requests", self.actor, outcome))
            updates.observe(m.child("rpc_tasks_server_request_duration_seconds", self.actor), duration)
        elif self.kind == "send":
            updates.inc(m.child("rpc_tasks_sends", self.actor, outcome))
        else:
            updates.observe(
                m.child("rpc_tasks_call_duration_seconds", self.actor, self.kind, outcome), duration
            )


class _SendScope(_OperationScope):
    """``.send()`` has no in-flight gauge."""

    def __init__(self, kind: str, actor: str) -> None:
        self.kind, self.actor = kind, actor

    def finish(self, outcome: str, error: BaseException | None, duration: float) -> None:
        updates.inc(_get().child("rpc_tasks_sends", self.actor, outcome))


def _scope(kind: str, labels: Mapping[str, Any]) -> _OperationScope | None:
    if kind in _CALLER_KINDS:
        actor = str(labels.get("actor", ""))
        return _OperationScope(kind, actor, _get().child("rpc_tasks_calls_in_flight", actor, kind))
    if kind == "serve":
        method = str(labels.get("method", ""))
        return _OperationScope(kind, method, _get().child("rpc_tasks_server_requests_in_flight", method))
    if kind == "send":
        return _SendScope(kind, str(labels.get("actor", "")))
    return None


def _on_event(event: str, labels: Mapping[str, Any]) -> None:
    m = _get()
    actor = str(labels.get("actor", ""))
    if event == "retry":
        m.child("rpc_tasks_worker_retries", actor, str(labels.get("code", ""))).inc()
    elif event == "postpone":
        m.child("rpc_tasks_worker_postponements", actor, str(labels.get("reason", ""))).inc()
    elif event in _WORKER_COUNTERS:
        m.child(_WORKER_COUNTERS[event], actor).inc()
    elif event == "gave_up":
        m.child("rpc_tasks_worker_gave_up", actor, str(labels.get("reason", ""))).inc()
    elif event == "server_dead_lettered":
        m.child("rpc_tasks_server_dead_lettered", str(labels.get("stream", ""))).inc()
    elif event == "server_backlog":
        where = (str(labels.get("stream", "")), str(labels.get("group", "")))
        m.child("rpc_tasks_server_pending", *where).set(labels.get("pending", 0))
        m.child("rpc_tasks_server_unread", *where).set(max(0, int(labels.get("unread", 0) or 0)))
    elif event.startswith("ws_"):
        _on_ws_event(m, event, labels)


def _on_ws_event(m: RPCMetrics, event: str, labels: Mapping[str, Any]) -> None:
    instance = str(labels.get("instance", ""))
    if event == "ws_connection":
        m.child("rpc_tasks_ws_connections", instance).inc(labels.get("delta", 0))
    elif event == "ws_delivery":
        m.child("rpc_tasks_ws_frames_offered", instance).inc(labels.get("offered", 0))
        m.child("rpc_tasks_ws_frames_delivered", instance).inc(labels.get("took", 0))
    elif event == "ws_fanout_acks":
        m.child("rpc_tasks_ws_fanout_acks_expected", instance).inc(labels.get("expected", 0))
        m.child("rpc_tasks_ws_fanout_acks_received", instance).inc(labels.get("received", 0))
    elif event == "ws_rate_limited":
        m.child("rpc_tasks_ws_rate_limited_frames", instance).inc()


class RPCMetricsMiddleware(Middleware):
    """Worker metrics that need Dramatiq hooks (attempts, dead letters); building one also
    calls :func:`enable_metrics`. Put ``dramatiq.middleware.prometheus.Prometheus`` on the same
    broker (``setup_broker(metrics=True)`` adds both): its exposition server shows these too."""

    def __init__(self) -> None:
        enable_metrics()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        updates.inc(_get().child("rpc_tasks_worker_attempts", message.actor_name, message.queue_name))

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        _get().child("rpc_tasks_worker_dead_lettered", message.actor_name, message.queue_name).inc()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        updates.flush()


def install_metrics(broker: dramatiq.Broker, *, dramatiq_prometheus: bool = True) -> dramatiq.Broker:
    """Add :class:`RPCMetricsMiddleware` (and, unless told not to, Dramatiq's ``Prometheus``
    series and exposition server, which a worker starts on ``dramatiq_prom_port``, through
    :class:`~rpc_tasks.observability.dramatiq_prometheus.RPCPrometheus`) to ``broker``
    (idempotent; a ``Prometheus`` middleware already there is kept)."""
    from dramatiq.middleware.prometheus import Prometheus

    from .dramatiq_prometheus import RPCPrometheus

    if dramatiq_prometheus and not any(isinstance(m, Prometheus) for m in broker.middleware):
        broker.add_middleware(RPCPrometheus())
    if not any(isinstance(m, RPCMetricsMiddleware) for m in broker.middleware):
        broker.add_middleware(RPCMetricsMiddleware())
    return broker
