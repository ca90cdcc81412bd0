"""Observability: OpenTelemetry traces (:mod:`.tracing`, ``pip install rpc-tasks[otel]``) and
Prometheus metrics (:mod:`.prometheus`, ``pip install rpc-tasks[prometheus]``).

Both are opt-in and import their third-party package only when turned on:
``setup_broker(tracing=True, metrics=True)`` for Dramatiq callers and workers,
:func:`enable_tracing` / :func:`enable_metrics` for other processes, ``--metrics-port`` for
``rpc-tasks serve`` and ``rpc-tasks ws``. ``docs/operating.md`` lists every span, attribute and
metric. Both feed on the in-process events of :mod:`rpc_tasks.metrics`.
"""

from .dramatiq_prometheus import RPCPrometheus
from .prometheus import (
    RPCMetricsMiddleware,
    disable_metrics,
    enable_metrics,
    flush_metrics,
    install_metrics,
    metrics_text,
    start_metrics_server,
)
from .tracing import (
    OPTION_TRACE,
    TracingMiddleware,
    disable_tracing,
    enable_tracing,
    install_tracing,
)

__all__ = [
    "OPTION_TRACE",
    "RPCMetricsMiddleware",
    "RPCPrometheus",
    "TracingMiddleware",
    "disable_metrics",
    "disable_tracing",
    "enable_metrics",
    "enable_tracing",
    "flush_metrics",
    "install_metrics",
    "install_tracing",
    "metrics_text",
    "start_metrics_server",
]


#: Dotted path of :class:`TracingMiddleware` (for django-dramatiq's ``MIDDLEWARE``).
TRACING_PATH = "rpc_tasks.observability.TracingMiddleware"
#: Dotted paths of the metrics middleware: Dramatiq's series and exposition server (through
#: :class:`RPCPrometheus`, cheaper per message), then ours.
METRICS_PATHS = ("rpc_tasks.observability.RPCPrometheus", "rpc_tasks.observability.RPCMetricsMiddleware")


def with_observability(paths: list[str], *, tracing: bool = False, metrics: bool = False) -> list[str]:
    """``paths`` (e.g. :func:`rpc_tasks.middleware_paths`) with the tracing middleware right
    after ``RPCReplies`` and the metrics middleware at the end, for django-dramatiq::

        "MIDDLEWARE": with_observability(rpc_tasks.middleware_paths(), tracing=True, metrics=True)
    """
    from ..middleware.order import REPLIES_PATH

    out = list(paths)
    if tracing and TRACING_PATH not in out:
        out.insert(out.index(REPLIES_PATH) + 1 if REPLIES_PATH in out else 0, TRACING_PATH)
    if metrics:
        out += [p for p in METRICS_PATHS if p not in out]
    return out


__all__ += ["METRICS_PATHS", "TRACING_PATH", "with_observability"]
