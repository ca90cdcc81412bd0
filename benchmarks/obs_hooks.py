"""CPU cost of the observability hooks per ``.call()``, without Redis or a worker (so without the
noise of a shared machine): what the caller runs around one call, and what the worker's tracing
middleware runs around one message, in microseconds.

    python -m benchmarks.obs_hooks [--n 20000]

Modes: ``off`` (nothing enabled: the flag check), ``otel-api`` (tracing on, no SDK provider),
``otel-sdk`` (tracing on, SDK with a ``BatchSpanProcessor`` serializing spans to /dev/null),
``metrics`` (Prometheus on). Divide by a ``.call()`` p50 (``make bench``) for the ratio.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from dramatiq.brokers.stub import StubBroker

from rpc_tasks import metrics, protocol

MODES = ("off", "otel-api", "otel-sdk", "metrics")


class _Message:
    """What the hooks read of a Dramatiq message."""

    def __init__(self, i: int) -> None:
        self.message_id = f"m{i}"
        self.actor_name = "bench_echo"
        self.queue_name = "bench"
        self.options: dict[str, Any] = {protocol.OPTION_REPLY_TO: "r:x", protocol.OPTION_DEADLINE: 9e9}
        self.failed = False


@metrics.observed("call", lambda *a, **k: {"actor": "bench_echo", "queue": "bench"})
def _call(middleware: Any, broker: Any, message: _Message) -> None:
    if middleware is not None:
        middleware.before_enqueue(broker, message, None)  # what .call() runs around the enqueue


def measure(mode: str, n: int) -> dict[str, float]:
    from rpc_tasks.observability import disable_metrics, disable_tracing, enable_metrics, enable_tracing
    from rpc_tasks.observability.tracing import TracingMiddleware

    broker = StubBroker()
    middleware: Any = None
    provider: Any = None
    if mode.startswith("otel"):
        middleware = TracingMiddleware()
        if mode == "otel-sdk":
            from benchmarks.workers.dramatiq_app import sdk_provider

            provider = sdk_provider()
        enable_tracing(tracer_provider=provider)
    elif mode == "metrics":
        enable_metrics()
    try:
        messages = [_Message(i) for i in range(n)]
        t0 = time.perf_counter()
        for message in messages:
            _call(middleware, broker, message)
        caller = (time.perf_counter() - t0) / n * 1e6
        worker = 0.0
        if middleware is not None:
            t0 = time.perf_counter()
            for message in messages:
                middleware.before_process_message(broker, message)
                middleware.after_process_message(broker, message, result=None)
            worker = (time.perf_counter() - t0) / n * 1e6
        elif mode == "metrics":
            from rpc_tasks.observability.prometheus import RPCMetricsMiddleware

            mw = RPCMetricsMiddleware()
            t0 = time.perf_counter()
            for message in messages:
                mw.before_process_message(broker, message)
            worker = (time.perf_counter() - t0) / n * 1e6
        return {"caller_us": caller, "worker_us": worker}
    finally:
        disable_tracing()
        disable_metrics()
        if provider is not None:
            provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    for mode in MODES:
        best = min((measure(mode, args.n) for _ in range(3)), key=lambda r: r["caller_us"] + r["worker_us"])
        print(
            f"{mode:10s} caller {best['caller_us']:7.2f} us/call   worker {best['worker_us']:7.2f} us/message"
        )


if __name__ == "__main__":
    main()
