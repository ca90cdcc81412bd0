"""Dramatiq paths, worker side (also imported by the client to declare the same actors).

    BENCH_DRAMATIQ_KIND=blocking dramatiq benchmarks.workers.dramatiq_app --processes 1 --threads 4

Kinds:

* ``blocking``: ``rpc_tasks.setup_broker()``'s default broker (``BlockingRedisBroker``) and an
  ``@rpc_actor`` echo, plus a plain ``@dramatiq.actor`` echo on the same queue;
* ``plain``: Dramatiq's own ``RedisBroker`` passed to ``rpc_tasks.setup_broker(broker)``, same
  ``@rpc_actor`` echo;
* ``rabbitmq``: Dramatiq's ``RabbitmqBroker`` (``BENCH_RABBITMQ_URL``) passed to
  ``rpc_tasks.setup_broker(broker)``, same ``@rpc_actor`` echo and config (replies over Redis);
* ``results``: no rpc-tasks at all: Dramatiq's ``RedisBroker`` + ``Results(backend=RedisBackend)``
  and a plain ``@dramatiq.actor(store_results=True)`` echo, everything at Dramatiq's defaults;
* ``dramatiq``: no rpc-tasks at all: Dramatiq's ``RedisBroker`` and a plain ``@dramatiq.actor``
  echo (no result backend), at Dramatiq's defaults;
* ``otel-api``, ``otel-sdk``, ``metrics``: ``blocking`` with ``setup_broker(tracing=True)``
  (``otel-api``: no SDK configured, only the API answers; ``otel-sdk``: the worker configures the
  SDK with a ``BatchSpanProcessor`` whose exporter encodes every span as JSON to ``/dev/null``) or
  ``setup_broker(metrics=True)`` (Dramatiq's Prometheus middleware and ours; the exposition
  server on ``dramatiq_prom_port``); ``metrics-ours``: rpc-tasks' metrics without Dramatiq's
  ``Prometheus`` middleware (to tell their costs apart). On the client side these kinds
  install nothing global: the paths turn tracing / metrics on only around their own runs (see
  ``benchmarks/rpc_paths.py``).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from pydantic import BaseModel

from benchmarks.common import Names, names, rabbitmq_url, redis_url

KINDS = (
    "blocking",
    "plain",
    "rabbitmq",
    "results",
    "dramatiq",
    "otel-api",
    "otel-sdk",
    "metrics",
    "metrics-ours",
)
#: Kinds measuring the cost of tracing and metrics (``blocking`` plus observability).
OBS_KINDS = ("otel-api", "otel-sdk", "metrics", "metrics-ours")
ACTOR_NAME = "bench_echo"
#: A plain ``@dramatiq.actor`` declared next to the ``@rpc_actor`` echo on the ``blocking``
#: broker and queue (the ``plain-send`` path: ``.send()`` without validation, same broker).
PLAIN_ACTOR_NAME = "bench_plain_echo"


class EchoParams(BaseModel):
    message: str


class EchoResult(BaseModel):
    message: str


def _echo(params: EchoParams) -> EchoResult:
    return EchoResult(message=params.message)


def _plain_echo(message: str) -> str:
    return message


def _plain_sink(message: str) -> None:
    """The plain actor of the send paths: returns nothing (a value without a result backend
    would make Dramatiq log a warning per message, slowing the worker down)."""


def sdk_provider() -> Any:
    """An SDK ``TracerProvider`` with a ``BatchSpanProcessor`` (default settings) whose exporter
    encodes each span as compact JSON (ids, name, kind, times, attributes, events, links: about
    what an OTLP/JSON exporter sends) and writes the batch to ``/dev/null``."""
    import json

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    sink = open(os.devnull, "w")  # lives as long as the process
    # BENCH_OTEL_EXPORTER=discard: batches are dropped unencoded (the SDK's own cost alone).
    encode = os.environ.get("BENCH_OTEL_EXPORTER", "json") != "discard"

    class DevNullJsonExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            records = []
            for span in spans if encode else ():
                ctx = span.get_span_context()
                records.append(
                    {
                        "traceId": f"{ctx.trace_id:032x}",
                        "spanId": f"{ctx.span_id:016x}",
                        "parentSpanId": f"{span.parent.span_id:016x}" if span.parent else "",
                        "name": span.name,
                        "kind": span.kind.value,
                        "startTimeUnixNano": span.start_time,
                        "endTimeUnixNano": span.end_time,
                        "attributes": dict(span.attributes or {}),
                        "events": [
                            {"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events
                        ],
                        "links": [f"{link.context.span_id:016x}" for link in span.links],
                        "status": span.status.status_code.value,
                    }
                )
            if encode:
                sink.write(json.dumps(records, default=str))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DevNullJsonExporter()))
    return provider


def build(
    kind: str, n: Names | None = None, url: str | None = None, *, worker: bool = False
) -> tuple[dramatiq.Broker, Any, str]:
    """``(broker, echo actor, queue name)`` of a worker kind; does not touch the global broker
    (except ``otel-sdk`` in a worker: the global SDK provider)."""
    n = n or names()
    url = url or redis_url()
    queue = n.queue(kind)
    if kind == "results":
        from dramatiq.brokers.redis import RedisBroker
        from dramatiq.results import Results
        from dramatiq.results.backends import RedisBackend

        broker = RedisBroker(url=url, namespace=n.namespace(kind))
        broker.add_middleware(Results(backend=RedisBackend(url=url)))
        actor = dramatiq.actor(
            _plain_echo, actor_name=ACTOR_NAME, queue_name=queue, broker=broker, store_results=True
        )
        return broker, actor, queue
    if kind == "dramatiq":
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url, namespace=n.namespace(kind))
        actor = dramatiq.actor(_plain_sink, actor_name=ACTOR_NAME, queue_name=queue, broker=broker)
        return broker, actor, queue
    from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker

    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=n.rpc_reply_prefix, rpc_timeout=10)
    if kind == "blocking":
        # Exactly what users get by default (namespace "dramatiq"; the queue name is unique).
        broker = setup_broker(config=config, broker_url=url, set_global=False)
    elif kind in OBS_KINDS:
        if worker and kind == "otel-sdk":
            from opentelemetry import trace

            trace.set_tracer_provider(sdk_provider())
        tracing = kind.startswith("otel")
        broker = setup_broker(config=config, broker_url=url, set_global=False, tracing=tracing)
        if worker and not tracing and os.environ.get("BENCH_METRICS_WORKER") != "0":
            from rpc_tasks.observability import install_metrics

            # BENCH_DRAMATIQ_PROMETHEUS=0: ours only (no exposition server), to split the cost.
            # metrics-ours: rpc-tasks' series only, to tell their cost from Dramatiq's middleware.
            dramatiq_prometheus = kind == "metrics" and os.environ.get("BENCH_DRAMATIQ_PROMETHEUS") != "0"
            install_metrics(broker, dramatiq_prometheus=dramatiq_prometheus)
        if not worker and tracing:
            from rpc_tasks.observability import disable_tracing

            disable_tracing()  # the client's paths turn it on around their own runs
    elif kind == "plain":
        from dramatiq.brokers.redis import RedisBroker

        broker = setup_broker(
            RedisBroker(url=url, namespace=n.namespace(kind)), config=config, set_global=False
        )
    elif kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = setup_broker(RabbitmqBroker(url=rabbitmq_url()), config=config, set_global=False)
    else:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    actor = rpc_actor(actor_name=ACTOR_NAME, queue_name=queue, broker=broker, max_retries=0)(_echo)
    if kind == "blocking":
        dramatiq.actor(_plain_sink, actor_name=PLAIN_ACTOR_NAME, queue_name=queue, broker=broker)
    return broker, actor, queue


def plain_actor(broker: dramatiq.Broker) -> Any:
    """The plain ``@dramatiq.actor`` of the ``blocking`` kind (declared by :func:`build`)."""
    return broker.get_actor(PLAIN_ACTOR_NAME)


broker: dramatiq.Broker | None = None
if os.environ.get("BENCH_DRAMATIQ_KIND"):
    # Imported by the dramatiq CLI: declare the worker's broker and actor, make it global.
    broker, echo, QUEUE = build(os.environ["BENCH_DRAMATIQ_KIND"], worker=True)
    dramatiq.set_broker(broker)
