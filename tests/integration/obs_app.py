"""Actors for the observability tests, run with ``dramatiq tests.integration.obs_app``.

Settings come from the environment so the test process and the worker process agree. With
``OBS_SPANS_FILE`` set, the process configures the OpenTelemetry SDK and writes every finished
span as one JSON line to that file (:class:`JsonLinesExporter`); with ``OBS_METRICS=1`` the
broker gets the Prometheus middleware (Dramatiq's and ours).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from rpc_tasks import RPCRemoteError, WebSocketRPCConfig, current_message, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

URL = os.environ.get("RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
QUEUE = "rpc_tasks_obs_test"
SPANS_FILE = os.environ.get("OBS_SPANS_FILE")


def span_record(span: Any) -> dict[str, Any]:
    """A finished SDK span as a JSON-able dict (ids in hex, as tracing UIs show them)."""
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "events": [event.name for event in span.events],
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "status": span.status.status_code.name,
        "pid": os.getpid(),
    }


def configure_sdk(path: str) -> None:
    """Install an SDK TracerProvider that appends each finished span to ``path`` at once."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    lock = threading.Lock()

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            with lock, open(path, "a", encoding="utf-8") as out:
                for span in spans:
                    out.write(json.dumps(span_record(span)) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
    trace.set_tracer_provider(provider)


if SPANS_FILE:
    configure_sdk(SPANS_FILE)

config = WebSocketRPCConfig(redis_url=URL, response_key_prefix="obs_app:resp:")
broker = setup_broker(
    BlockingRedisBroker(url=URL, namespace="obs_app"),
    config=config,
    tracing=True,
    metrics=os.environ.get("OBS_METRICS") == "1",
)


class EchoParams(BaseModel):
    message: str
    fail_first: bool = False


class EchoResult(BaseModel):
    message: str
    attempt: int


def _retries() -> int:
    message = current_message()
    return int(message.options.get("retries", 0) or 0) if message is not None else 0


@rpc_actor(queue_name=QUEUE, max_retries=3, min_backoff=10, max_backoff=50)
def echo(params: EchoParams) -> EchoResult:
    """Echoes; with ``fail_first`` the first attempt fails with a retryable error."""
    if params.fail_first and _retries() == 0:
        raise RPCRemoteError.from_code("service_unavailable", "first attempt fails")
    return EchoResult(message=params.message, attempt=_retries() + 1)


@rpc_actor(queue_name=QUEUE, max_retries=3, min_backoff=10, max_backoff=50)
def broken(params: EchoParams) -> EchoResult:
    """Always fails with a non-retryable error (dead-lettered at once)."""
    raise RPCRemoteError.from_code("invalid_request", "never works")


@rpc_actor(queue_name=QUEUE, max_retries=3, min_backoff=10, max_backoff=50, rate_limit_key="obs-limited")
def limited(params: EchoParams) -> EchoResult:
    """With ``fail_first``: the first attempt reports a rate limit (a 0.5 s cooldown)."""
    if params.fail_first and _retries() == 0:
        raise RPCRemoteError.from_code("rate_limit_exceeded", "slow down", retry_after=0.5)
    return EchoResult(message=params.message, attempt=_retries() + 1)
