"""rpc-tasks' synchronous paths of the benchmark (client side): ``.call()`` on each broker,
``.send()``, ``.call_many()``, ``WebSocketRPCClient.call()`` against an ``RPCServer``, and
``.call()`` with tracing or metrics on (the observability paths). Async ``acall`` paths are in
:mod:`benchmarks.aio_paths`; the base class and floors in :mod:`benchmarks.paths`.

rpc_tasks is imported only when a path is set up (see :mod:`benchmarks.paths`).
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import MESSAGE
from benchmarks.paths import CALL_TIMEOUT, Path, build, run_in_batches, send_and_join


class CallPath(Path):
    """``@rpc_actor`` ``.call()``; ``kind`` picks the broker (see ``workers/dramatiq_app.py``)."""

    kind = "blocking"
    name = "call"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import EchoParams

        self.broker, self.actor, self.queue = build(self.kind)
        self.params = EchoParams(message=MESSAGE)

    def probe(self) -> None:
        self.actor.call(self.params, timeout=1.0)

    def one(self) -> None:
        result = self.actor.call(self.params, timeout=CALL_TIMEOUT)
        if result.message != MESSAGE:
            raise AssertionError(f"bad echo {result!r}")


class CallPlainPath(CallPath):
    kind = "plain"
    name = "call-plain"


class CallRabbitmqPath(CallPath):
    """Same ``@rpc_actor`` and config, Dramatiq's ``RabbitmqBroker`` (replies still over Redis)."""

    kind = "rabbitmq"
    name = "call-rabbitmq"

    def close(self) -> None:
        self.broker.close()


class SendPath(CallPath):
    """``.send()`` N messages (each ``.send()`` timed: the enqueue round trip), then
    ``broker.join(queue)`` until the worker has processed (acked) them all."""

    name = "send"
    first_call = False

    def probe(self) -> None:
        super().probe()
        self.broker.join(self.queue, interval=5, timeout=30_000)

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return send_and_join(self, n, bar)


class PlainSendPath(SendPath):
    """A plain ``@dramatiq.actor``'s ``.send(x)`` on the *same* broker and worker as ``send``
    (no params model, no validation), measured exactly like ``send``."""

    name = "plain-send"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import plain_actor

        super().setup()
        self.actor = plain_actor(self.broker)
        self.params = MESSAGE

    def probe(self) -> None:
        self.actor.send(self.params)
        self.broker.join(self.queue, interval=5, timeout=30_000)


class InflightPath(CallPath):
    """``.call_many()``: ``--batch`` calls in flight from one thread, results collected."""

    name = "inflight"
    first_call = False
    batch = 100

    def na_reason(self) -> str | None:
        self.setup()
        if not callable(getattr(self.actor, "call_many", None)):
            return "n/a (no call_many yet)"
        return None

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return run_in_batches(
            n,
            bar,
            self.batch,
            lambda size: list(self.actor.call_many([self.params] * size, timeout=30.0)),
            lambda rs, size: len(rs) == size and all(r.message == MESSAGE for r in rs),
        )


class StreamsPath(Path):
    """``WebSocketRPCClient.call("echo", ...)`` against an ``RPCServer`` process."""

    name = "streams"

    def setup(self) -> None:
        from benchmarks.workers.streams_app import config
        from rpc_tasks import EchoParams, EchoResult, WebSocketRPCClient

        self.client = WebSocketRPCClient(config())
        self.params = EchoParams(message=MESSAGE)
        self.result_model = EchoResult

    def probe(self) -> None:
        self.client.call("echo", self.params, self.result_model, timeout=1.0)

    def one(self) -> None:
        result = self.client.call("echo", self.params, self.result_model, timeout=CALL_TIMEOUT)
        if result.message != MESSAGE:
            raise AssertionError("bad echo")

    def close(self) -> None:
        self.client.close()


# -- observability ----------------------------------------------------------------------------


class ObsBasePath(CallPath):
    """``.call()`` without tracing or metrics: the baseline of the observability paths."""

    name = "obs-base"
    first_call = False


class ObsPath(CallPath):
    """``.call()`` with tracing or metrics turned on around each of its runs only (the client
    process measures the baseline too)."""

    first_call = False

    def enable(self) -> None:
        raise NotImplementedError

    def disable(self) -> None:
        raise NotImplementedError

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        self.enable()
        try:
            return super().run(n, bar)
        finally:
            self.disable()


class OtelApiPath(ObsPath):
    """``setup_broker(tracing=True)`` on both sides, OpenTelemetry API only (no SDK provider)."""

    kind = "otel-api"
    name = "call-otel-api"

    def enable(self) -> None:
        from rpc_tasks.observability import enable_tracing

        enable_tracing()

    def disable(self) -> None:
        from rpc_tasks.observability import disable_tracing

        disable_tracing()


class OtelSdkPath(OtelApiPath):
    """Tracing with the SDK and a batch exporter on both sides (spans serialized to /dev/null)."""

    kind = "otel-sdk"
    name = "call-otel-sdk"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import sdk_provider

        super().setup()
        self.provider = sdk_provider()

    def enable(self) -> None:
        from rpc_tasks.observability import enable_tracing

        enable_tracing(tracer_provider=self.provider)

    def close(self) -> None:
        self.provider.shutdown()


class MetricsPath(ObsPath):
    """Prometheus metrics on both sides (the worker: ``setup_broker(metrics=True)``, which
    includes Dramatiq's own ``Prometheus`` middleware)."""

    kind = "metrics"
    name = "call-metrics"

    def enable(self) -> None:
        from rpc_tasks.observability import enable_metrics

        enable_metrics()

    def disable(self) -> None:
        from rpc_tasks.observability import disable_metrics

        disable_metrics()


class MetricsOursPath(MetricsPath):
    """rpc-tasks' metrics only: the worker has ``RPCMetricsMiddleware`` without Dramatiq's
    ``Prometheus`` middleware (``install_metrics(broker, dramatiq_prometheus=False)``)."""

    kind = "metrics-ours"
    name = "call-metrics-ours"
