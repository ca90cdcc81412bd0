"""Traces across processes: a caller here, a real ``dramatiq`` worker subprocess that exports its
spans as JSON lines; and Streams requests to a real ``RPCServer``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc_tasks import (
    AsyncWebSocketRPCClient,
    RPCRemoteError,
    WebSocketRPCConfig,
    aclose_loop_connections,
    protocol,
)
from rpc_tasks.observability import tracing
from rpc_tasks.streams import RPCServer, WebSocketRPCClient

from .support import unique, wait_until

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def caller_spans() -> Iterator[InMemorySpanExporter]:
    """This process's spans (an SDK provider set once per process; tracing on for the module)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    tracing.enable_tracing()
    yield _EXPORTER
    tracing.disable_tracing()


@pytest.fixture
def spans(caller_spans: InMemorySpanExporter) -> InMemorySpanExporter:
    caller_spans.clear()
    return caller_spans


@pytest.fixture
def obs_app(redis_url: str, spans: InMemorySpanExporter) -> Any:
    from tests.integration import obs_app

    return obs_app


class Worker:
    """``dramatiq tests.integration.obs_app`` with the SDK writing spans to ``spans_file``."""

    def __init__(self, redis_url: str, spans_file: Path, **env: str) -> None:
        self.spans_file = spans_file
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.integration.obs_app",
                "--processes",
                "1",
                "--threads",
                "2",
            ],
            cwd=ROOT,
            env={**os.environ, "RPC_TEST_REDIS_URL": redis_url, "OBS_SPANS_FILE": str(spans_file), **env},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def spans(self) -> list[dict[str, Any]]:
        if not self.spans_file.exists():
            return []
        return [json.loads(line) for line in self.spans_file.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def worker(redis_url: str, tmp_path: Path, obs_app: Any) -> Iterator[Worker]:
    w = Worker(redis_url, tmp_path / "worker-spans.jsonl")
    try:
        # Up when it answers (the first call may wait for the worker process to boot).
        obs_app.echo.call(obs_app.EchoParams(message="warm-up"), timeout=60)
        yield w
    finally:
        w.stop()


def _hex(span_id: int) -> str:
    return f"{span_id:016x}"


def test_worker_span_is_child_of_the_callers_span_across_processes(
    obs_app: Any, worker: Worker, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("django request") as root:
        result = obs_app.echo.call(obs_app.EchoParams(message="traced"), timeout=30)
    assert result.message == "traced"
    mine = {s.name: s for s in spans.get_finished_spans()}
    call = mine["call echo"]
    assert call.parent is not None and call.parent.span_id == root.get_span_context().span_id
    assert call.kind is trace.SpanKind.CLIENT
    assert call.attributes is not None
    assert call.attributes["messaging.system"] == "dramatiq"
    assert call.attributes["messaging.destination.name"] == obs_app.QUEUE
    assert call.attributes["messaging.operation.name"] == "call"
    trace_id = f"{call.context.trace_id:032x}"

    def worker_span() -> dict[str, Any] | None:
        return next((s for s in worker.spans() if s["trace_id"] == trace_id), None)

    span = wait_until(worker_span, timeout=30)
    assert span["name"] == "process echo"
    assert span["kind"] == "CONSUMER"
    assert span["pid"] != os.getpid()  # exported by the worker process
    assert span["parent_id"] == _hex(call.context.span_id)
    assert isinstance(span["attributes"]["messaging.message.id"], str)
    assert span["attributes"]["messaging.message.id"]
    assert "rpc_tasks.outcome" not in span["attributes"] and span["status"] == "UNSET"
    assert span["attributes"]["rpc_tasks.attempt"] == 1


def test_send_and_call_many_carry_the_trace_context(
    obs_app: Any, worker: Worker, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("job"):
        message = obs_app.echo.send(obs_app.EchoParams(message="bg"))
        results = obs_app.echo.call_many([obs_app.EchoParams(message=str(i)) for i in range(3)], timeout=30)
    assert [r.message for r in results] == ["0", "1", "2"]
    mine = {s.name: s for s in spans.get_finished_spans()}
    send, batch = mine["send echo"], mine["call_many echo"]
    assert send.kind is trace.SpanKind.PRODUCER
    assert message.options[tracing.OPTION_TRACE]["traceparent"].split("-")[2] == _hex(send.context.span_id)
    trace_id = f"{send.context.trace_id:032x}"

    def worker_spans() -> list[dict[str, Any]] | None:
        found = [s for s in worker.spans() if s["trace_id"] == trace_id and s["name"] == "process echo"]
        return found if len(found) == 4 else None

    found = wait_until(worker_spans, timeout=30)
    parents = sorted(s["parent_id"] for s in found)
    assert parents == sorted([_hex(send.context.span_id)] + [_hex(batch.context.span_id)] * 3)


def test_retry_attempts_are_children_of_the_caller_and_link_to_the_first(
    obs_app: Any, worker: Worker, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    result = obs_app.echo.call(obs_app.EchoParams(message="again", fail_first=True), timeout=30)
    assert result.attempt == 2
    call = next(s for s in spans.get_finished_spans() if s.name == "call echo")
    trace_id = f"{call.context.trace_id:032x}"

    def attempts() -> list[dict[str, Any]] | None:
        found = [s for s in worker.spans() if s["trace_id"] == trace_id]
        return found if len(found) == 2 else None

    first, second = sorted(
        wait_until(attempts, timeout=30), key=lambda s: s["attributes"]["rpc_tasks.attempt"]
    )
    assert first["parent_id"] == second["parent_id"] == _hex(call.context.span_id)
    assert first["attributes"]["rpc_tasks.outcome"] == "service_unavailable"
    assert "retry" in first["events"] and first["status"] == "ERROR"
    assert second["links"] == [first["span_id"]]
    assert "rpc_tasks.outcome" not in second["attributes"]


def test_postponement_and_dead_letter_are_recorded(
    obs_app: Any, worker: Worker, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    obs_app.limited.send(obs_app.EchoParams(message="opens the cooldown", fail_first=True))
    wait_until(lambda: any("cooldown_opened" in s["events"] for s in worker.spans()), timeout=30)
    result = obs_app.limited.call(obs_app.EchoParams(message="waits"), timeout=30)
    assert result.message == "waits"
    call = next(s for s in spans.get_finished_spans() if s.name == "call limited")
    trace_id = f"{call.context.trace_id:032x}"
    mine = [s for s in worker.spans() if s["trace_id"] == trace_id]
    postponed = [s for s in mine if "postpone" in s["events"]]
    assert postponed and postponed[0]["attributes"]["rpc_tasks.outcome"] == "skipped"
    assert postponed[0]["status"] == "UNSET"
    ran = [s for s in mine if "rpc_tasks.outcome" not in s["attributes"]]
    assert len(ran) == 1 and ran[0]["links"] == [postponed[0]["span_id"]]

    spans.clear()
    with pytest.raises(RPCRemoteError):
        obs_app.broken.call(obs_app.EchoParams(message="x"), timeout=30)
    call = next(s for s in spans.get_finished_spans() if s.name == "call broken")
    assert call.attributes is not None and call.attributes["error.type"] == "invalid_request"
    trace_id = f"{call.context.trace_id:032x}"
    dead = wait_until(
        lambda: [
            s for s in worker.spans() if s["trace_id"] == trace_id and s["name"] == "dead_letter broken"
        ],
        timeout=30,
    )
    assert dead[0]["parent_id"] == _hex(call.context.span_id)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a test coroutine on a fresh loop and close the loop's connections after it."""

    async def main() -> Any:
        try:
            return await coro_fn()
        finally:
            await aclose_loop_connections()

    return asyncio.run(main())


def test_async_callers_carry_the_trace_context(
    obs_app: Any, worker: Worker, spans: InMemorySpanExporter
) -> None:
    """``acall`` / ``acall_many`` / ``asend`` open the spans their sync twins open, and the
    worker's runs are their children: on the loop's own enqueue paths and on the thread-pool
    one (a message with a ``delay``)."""
    spans.clear()
    echo, params = obs_app.echo, obs_app.EchoParams
    tracer = trace.get_tracer("test")

    async def scenario() -> tuple[Any, list[Any]]:
        with tracer.start_as_current_span("async view") as root:
            lone = await echo.acall(params(message="lone"), timeout=30)  # the fast lane
            later = await echo.acall(params(message="later"), timeout=30, delay=1)  # thread pool
            many = await echo.acall_many([params(message=str(i)) for i in range(3)], timeout=30)
            sent = [
                await echo.asend(params(message="bg")),
                await echo.asend(params(message="bg later"), delay=1),  # thread pool
            ]
        assert [lone.message, later.message, *(r.message for r in many)] == ["lone", "later", "0", "1", "2"]
        return root, sent

    root, sent = run(scenario)
    mine = [s for s in spans.get_finished_spans() if s.name.endswith(" echo")]
    by_name = {
        name: [s for s in mine if s.name == name] for name in ("call echo", "call_many echo", "send echo")
    }
    assert [len(v) for v in by_name.values()] == [2, 1, 2]
    for span in mine:
        assert span.parent is not None and span.parent.span_id == root.get_span_context().span_id
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == obs_app.QUEUE
        assert span.attributes["messaging.operation.name"] == span.name.split()[0]
    assert {s.kind for s in by_name["call echo"] + by_name["call_many echo"]} == {trace.SpanKind.CLIENT}
    assert {s.kind for s in by_name["send echo"]} == {trace.SpanKind.PRODUCER}
    carried = sorted(m.options[tracing.OPTION_TRACE]["traceparent"].split("-")[2] for m in sent)
    assert carried == sorted(_hex(s.context.span_id) for s in by_name["send echo"])
    trace_id = f"{root.get_span_context().trace_id:032x}"

    def worker_spans() -> list[dict[str, Any]] | None:
        found = [s for s in worker.spans() if s["trace_id"] == trace_id and s["name"] == "process echo"]
        return found if len(found) == 7 else None

    found = wait_until(worker_spans, timeout=30)
    batch = by_name["call_many echo"][0]
    expected = [*by_name["call echo"], batch, batch, batch, *by_name["send echo"]]
    assert sorted(s["parent_id"] for s in found) == sorted(_hex(s.context.span_id) for s in expected)


# -- Streams -------------------------------------------------------------------------------------


def _streams_config(redis_url: str, **extra: Any) -> WebSocketRPCConfig:
    return WebSocketRPCConfig(
        redis_url=redis_url,
        request_stream=unique("obs:stream"),
        consumer_group=unique("obs-group"),
        response_key_prefix=unique("obs:resp") + ":",
        **extra,
    )


def test_streams_request_carries_the_trace_to_the_server(redis_url: str, spans: InMemorySpanExporter) -> None:
    config = _streams_config(redis_url)
    server = RPCServer(config, concurrency=2, claim_interval=0.5, claim_idle=2)
    server.start()
    client = WebSocketRPCClient(config)
    try:
        from rpc_tasks.streams.builtins import EchoParams, EchoResult

        with trace.get_tracer("test").start_as_current_span("view"):
            assert client.call("echo", EchoParams(message="hi"), EchoResult, timeout=10).message == "hi"
    finally:
        client.close()
        server.stop()
    mine = {s.name: s for s in spans.get_finished_spans()}
    call, served = mine["call echo"], mine["serve echo"]
    assert served.kind is trace.SpanKind.SERVER
    assert served.parent is not None and served.parent.span_id == call.context.span_id
    assert served.context.trace_id == call.context.trace_id


def test_async_streams_client_and_fire_and_forget_carry_the_trace(
    redis_url: str, spans: InMemorySpanExporter
) -> None:
    """``AsyncWebSocketRPCClient.call`` opens ``call <method>`` (the lone-call path and the
    concurrent one); ``fire_and_forget`` (sync and async) opens ``send <method>`` (PRODUCER);
    each served request is a child of its caller's span."""
    from rpc_tasks.streams.builtins import EchoParams, EchoResult

    config = _streams_config(redis_url)
    server = RPCServer(config, concurrency=2, claim_interval=0.5, claim_idle=2)
    server.start()
    client, sync_client = AsyncWebSocketRPCClient(config), WebSocketRPCClient(config)
    tracer = trace.get_tracer("test")

    async def scenario() -> None:
        with tracer.start_as_current_span("async view"):
            assert (
                await client.call("echo", EchoParams(message="lone"), EchoResult, timeout=10)
            ).message == "lone"
            pair = await asyncio.gather(
                *(client.call("echo", EchoParams(message=str(i)), EchoResult, timeout=10) for i in range(2))
            )
            assert [r.message for r in pair] == ["0", "1"]
            await client.fire_and_forget("echo", EchoParams(message="async bg"))

    try:
        run(scenario)
        with tracer.start_as_current_span("sync view"):
            sync_client.fire_and_forget("echo", EchoParams(message="sync bg"))
        wait_until(
            lambda: len([s for s in spans.get_finished_spans() if s.name == "serve echo"]) == 5, timeout=30
        )
    finally:
        sync_client.close()
        server.stop()
    finished = spans.get_finished_spans()
    calls = [s for s in finished if s.name == "call echo"]
    sends = [s for s in finished if s.name == "send echo"]
    served = [s for s in finished if s.name == "serve echo"]
    assert len(calls) == 3 and {s.kind for s in calls} == {trace.SpanKind.CLIENT}
    assert len(sends) == 2 and {s.kind for s in sends} == {trace.SpanKind.PRODUCER}
    assert sorted(s.parent.span_id for s in served if s.parent is not None) == sorted(
        s.context.span_id for s in calls + sends
    )
    by_id = {s.context.span_id: s for s in calls + sends}
    for span in served:
        assert span.parent is not None
        assert span.context.trace_id == by_id[span.parent.span_id].context.trace_id


def test_streams_client_sends_no_trace_context_to_strict_servers(
    redis_url: str, spans: InMemorySpanExporter
) -> None:
    import redis

    config = _streams_config(redis_url, announce_extensions=False)
    client = WebSocketRPCClient(config)
    try:
        from rpc_tasks.streams.builtins import EchoParams

        with trace.get_tracer("test").start_as_current_span("view"):
            client.fire_and_forget("echo", EchoParams(message="hi"))
            with pytest.raises(Exception):  # noqa: B017 - nobody serves: a timeout
                client.call("echo", EchoParams(message="x"), EchoParams, timeout=0.2)
        raw = redis.Redis.from_url(redis_url).xrange(config.request_stream)
    finally:
        client.close()
    bodies = [json.loads(fields[b"payload"]) for _, fields in raw]
    assert len(bodies) == 2
    for body in bodies:
        assert set(body) == {"correlation_id", "timestamp", "method", "reply_to", "timeout", "params"}


def test_malformed_trace_context_is_ignored_by_the_decoder() -> None:
    base = {
        "correlation_id": "c1",
        "timestamp": protocol.now_iso(),
        "method": "echo",
        "reply_to": "r:c1",
        "timeout": 5,
        "params": {},
    }
    for bad in ({"traceparent": 5}, "00-abc", {str(i): "x" for i in range(20)}, {"k": "v" * 5000}):
        assert protocol.decode_request(json.dumps({**base, "trace_context": bad})).trace_context is None
    good = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    assert protocol.decode_request(json.dumps({**base, "trace_context": good})).trace_context == good


def test_websocket_delivery_is_an_event_of_the_serving_span(
    redis_url: str, spans: InMemorySpanExporter
) -> None:
    pytest.importorskip("websockets")
    import asyncio
    import threading

    from websockets.asyncio.client import connect

    from rpc_tasks import NotificationRequest, NotificationResponse
    from rpc_tasks.websocket.server import WebSocketServer

    from .test_wsserver import recv_json, ws_config

    config = ws_config(redis_url)
    server = WebSocketServer(config, host="127.0.0.1", port=0, instance_id=unique("obs-ws"))
    loop = asyncio.new_event_loop()
    stop, started = asyncio.Event(), threading.Event()

    async def serve() -> None:
        ready = asyncio.Event()
        task = asyncio.ensure_future(server.serve(stop, ready))
        await ready.wait()
        started.set()
        await task

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    client = WebSocketRPCClient(config)

    def notify() -> NotificationResponse:
        with trace.get_tracer("test").start_as_current_span("view"):
            request = NotificationRequest(user_id="bob", notification_type="t", title="T", message="m")
            return client.call("send_notification", request, NotificationResponse, timeout=10)

    async def scenario() -> None:
        from rpc_tasks.websocket.auth import make_token

        from .test_wsserver import SECRET

        url = f"ws://127.0.0.1:{server.bound_port}/ws?token={make_token('bob', SECRET)}"
        async with connect(url) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            result = await asyncio.get_running_loop().run_in_executor(None, notify)
            assert result.delivered
            assert (await recv_json(ws))["type"] == "notification"

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    mine = {s.name: s for s in spans.get_finished_spans()}
    call, served = mine["call send_notification"], mine["serve send_notification"]
    assert served.parent is not None and served.parent.span_id == call.context.span_id
    deliveries = [e for e in served.events if e.name == "ws_delivery"]
    assert len(deliveries) == 1 and deliveries[0].attributes is not None
    assert deliveries[0].attributes["rpc_tasks.took"] == 1
