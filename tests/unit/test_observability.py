"""Observability hooks without services: no import and no work unless enabled, the outcome of an
observed operation, where the middleware goes, the Streams ``trace_context`` extension."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker
from pydantic import BaseModel

from rpc_tasks import (
    RPCConnectionError,
    RPCError,
    RPCRemoteError,
    RPCTimeoutError,
    check_broker,
    metrics,
    middleware_paths,
    protocol,
    setup_broker,
)

ROOT = Path(__file__).resolve().parents[2]

_BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("opentelemetry", "prometheus_client"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_nothing_is_imported_or_registered_unless_enabled() -> None:
    done = _run(
        "import sys, rpc_tasks\n"
        "from dramatiq.brokers.stub import StubBroker\n"
        "rpc_tasks.setup_broker(StubBroker(), set_global=False)\n"
        "assert not rpc_tasks.metrics.active\n"
        "names = ('rpc_tasks.observability', 'prometheus_client')\n"
        "print(sorted(m for m in sys.modules if m.startswith(names)))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_the_packages_enabling_says_what_to_install() -> None:
    done = _run(
        _BLOCKER + "import rpc_tasks\n"
        "from dramatiq.brokers.stub import StubBroker\n"
        "rpc_tasks.setup_broker(StubBroker(), set_global=False)\n"
        "for kw in ('tracing', 'metrics'):\n"
        "    try:\n"
        "        rpc_tasks.setup_broker(StubBroker(), set_global=False, **{kw: True})\n"
        "    except rpc_tasks.RPCConfigurationError as exc:\n"
        "        print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "tracing needs OpenTelemetry: pip install 'rpc-tasks[otel]'",
        "metrics need prometheus_client: pip install 'rpc-tasks[prometheus]'",
    ]


class _Scope:
    def __init__(self, log: list[Any], kind: str) -> None:
        self.log, self.kind = log, kind

    def finish(self, outcome: str, error: BaseException | None, duration: float) -> None:
        assert duration >= 0
        self.log.append((self.kind, outcome, type(error).__name__ if error else None))


@pytest.fixture
def recorded() -> Any:
    log: list[Any] = []
    events: list[tuple[str, dict[str, Any]]] = []

    def factory(kind: str, labels: Mapping[str, Any]) -> _Scope:
        return _Scope(log, kind)

    def listener(event: str, labels: Mapping[str, Any]) -> None:
        events.append((event, dict(labels)))

    metrics.add_scope_factory(factory)
    metrics.add_listener(listener)
    yield log, events
    metrics.remove_scope_factory(factory)
    metrics.remove_listener(listener)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (RPCRemoteError(RPCError(code="rate_limit_exceeded", message="x")), "rate_limit_exceeded"),
        (RPCTimeoutError("m", 1.0), "timeout"),
        (RPCConnectionError("down"), "connection"),
        (KeyError("k"), "error"),
    ],
)
def test_an_observed_operation_ends_with_the_outcome_of_its_error(
    recorded: Any, error: BaseException, outcome: str
) -> None:
    log, events = recorded
    with pytest.raises(type(error)), metrics.observe("call", actor="a", queue="q"):
        raise error
    assert log == [("call", outcome, type(error).__name__)]
    assert events[-1][0] == "call" and events[-1][1]["outcome"] == outcome
    assert events[-1][1]["actor"] == "a" and events[-1][1]["duration"] >= 0


def test_set_outcome_and_list_results(recorded: Any) -> None:
    log, _ = recorded
    with metrics.observe("serve", method="m"):
        metrics.set_outcome("method_not_found")
    metrics.set_outcome("ignored outside any observation")

    class Batch:
        actor_name = "b"

        @metrics.observed("call_many", lambda self, *a, **k: {"actor": self.actor_name})
        def run(self, results: list[Any]) -> list[Any]:
            return results

    assert Batch().run([1, RPCTimeoutError("b", 1.0)])[0] == 1
    assert Batch().run([1, 2]) == [1, 2]
    assert log == [
        ("serve", "method_not_found", None),
        ("call_many", "timeout", None),
        ("call_many", "ok", None),
    ]


def test_a_failing_scope_or_listener_never_breaks_the_call(recorded: Any) -> None:
    def bad_factory(kind: str, labels: Mapping[str, Any]) -> Any:
        raise RuntimeError("boom")

    def bad_listener(event: str, labels: Mapping[str, Any]) -> None:
        raise RuntimeError("boom")

    metrics.add_scope_factory(bad_factory)
    metrics.add_listener(bad_listener)
    try:
        with metrics.observe("call", actor="a"):
            pass
    finally:
        metrics.remove_scope_factory(bad_factory)
        metrics.remove_listener(bad_listener)
    assert recorded[0] == [("call", "ok", None)]


def test_setup_broker_places_the_observability_middleware() -> None:
    pytest.importorskip("opentelemetry")
    pytest.importorskip("prometheus_client")
    from rpc_tasks.middleware import RPCRateLimits, RPCReplies
    from rpc_tasks.observability import (
        RPCMetricsMiddleware,
        RPCPrometheus,
        TracingMiddleware,
        disable_metrics,
        disable_tracing,
    )

    try:
        broker = setup_broker(StubBroker(), set_global=False, tracing=True, metrics=True)
        kinds = [type(m) for m in broker.middleware]
        assert kinds[:3] == [RPCReplies, TracingMiddleware, RPCRateLimits]
        assert kinds[-2:] == [RPCPrometheus, RPCMetricsMiddleware]
        assert check_broker(broker) == []
        setup_broker(broker, set_global=False, tracing=True, metrics=True)
        assert [type(m) for m in broker.middleware] == kinds  # idempotent
    finally:
        disable_tracing()
        disable_metrics()


def test_django_paths_with_observability_import_and_keep_the_order() -> None:
    pytest.importorskip("opentelemetry")
    from rpc_tasks.observability import TRACING_PATH, disable_tracing, with_observability

    paths = with_observability(middleware_paths(), tracing=True, metrics=True)
    assert paths[:3] == [middleware_paths()[0], TRACING_PATH, middleware_paths()[1]]
    assert paths[-2:] == [
        "rpc_tasks.observability.RPCPrometheus",
        "rpc_tasks.observability.RPCMetricsMiddleware",
    ]
    for path in paths:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name)
    assert with_observability(paths, tracing=True, metrics=True) == paths
    disable_tracing()


class P(BaseModel):
    x: int = 1


def test_trace_context_goes_only_with_announced_extensions() -> None:
    carrier = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    common: dict[str, Any] = {
        "reply_to": "r:1",
        "timeout": 5,
        "correlation_id": "1",
        "trace_context": carrier,
    }
    strict = json.loads(protocol.encode_request("m", P(), **common))
    assert "trace_context" not in strict and "extensions" not in strict
    announced = json.loads(protocol.encode_request("m", P(), extensions={"error_details"}, **common))
    assert announced["trace_context"] == carrier
    assert announced["extensions"] == ["error_details", "trace_context"]
    assert protocol.decode_request(json.dumps(announced)).trace_context == carrier


def test_enable_without_sdk_records_nothing() -> None:
    pytest.importorskip("opentelemetry")
    done = _run(
        "from rpc_tasks import metrics\n"
        "from rpc_tasks.observability import tracing\n"
        "tracing.enable_tracing()\n"
        "with metrics.observe('call', actor='a', queue='q') as obs:\n"
        "    assert obs.scopes == [], obs.scopes\n"
        "assert metrics.trace_context() is None\n"
        "print('ok')"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_async_callers_are_wrapped_only_while_something_observes(
    recorded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No extra coroutine frame per waiting call when nothing observes: ``acall`` & co. then
    return the bare coroutine of :mod:`rpc_tasks.aio`; otherwise an observing one."""
    from rpc_tasks import AsyncWebSocketRPCClient, WebSocketRPCConfig, rpc_actor
    from rpc_tasks.aio import calls as aio_calls
    from rpc_tasks.aio import client as aio_client

    broker = setup_broker(StubBroker(), set_global=False)

    class P(BaseModel):
        n: int

    @rpc_actor(broker=broker)
    def double(params: P) -> P:
        return P(n=params.n * 2)

    client = AsyncWebSocketRPCClient(WebSocketRPCConfig(redis_url="redis://127.0.0.1:1/0"))

    def made() -> list[Any]:
        return [
            double.acall(P(n=1)),
            double.acall_many([P(n=1)]),
            double.asend(P(n=1)),
            client.call("m", P(n=1), P),
            client.fire_and_forget("m", P(n=1)),
        ]

    def close(coros: list[Any]) -> list[Any]:
        codes = []
        for coro in coros:
            codes.append(coro.cr_code)
            inner = coro.cr_frame.f_locals.get("awaitable")
            if inner is not None:
                inner.close()
            coro.close()
        return codes

    assert close(made())[:3] == [metrics.observing.__code__] * 3
    monkeypatch.setattr(metrics, "active", False)
    assert close(made())[:3] == [
        aio_calls.acall.__code__,
        aio_calls.acall_many.__code__,
        aio_calls.asend.__code__,
    ]
    # The client's methods stay coroutine functions (mocks, iscoroutinefunction) on every Python.
    assert inspect.iscoroutinefunction(aio_client.AsyncWebSocketRPCClient.call)
    assert inspect.iscoroutinefunction(aio_client.AsyncWebSocketRPCClient.fire_and_forget)


def test_an_observed_coroutine_runs_inside_its_observation(recorded: Any) -> None:
    """The observation is current in the awaited coroutine (so before_enqueue hooks see its
    span), a list of results takes its first error's outcome, a cancelled wait is ``cancelled``."""
    import asyncio

    log, events = recorded
    seen: list[Any] = []

    async def work(result: Any) -> Any:
        seen.append(metrics._current.get())
        await asyncio.sleep(0)
        return result

    async def scenario() -> None:
        assert await metrics.observing("call", {"actor": "a"}, work(5)) == 5
        await metrics.observing("call_many", {"actor": "a"}, work([RPCTimeoutError("a", 1.0)]))
        task = asyncio.ensure_future(metrics.observing("call", {"actor": "a"}, asyncio.sleep(30)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert metrics._current.get() is None

    asyncio.run(scenario())
    assert [type(s).__name__ for s in seen] == ["Observation", "Observation"]
    assert log == [
        ("call", "ok", None),
        ("call_many", "timeout", None),
        ("call", "cancelled", "CancelledError"),
    ]
    assert [e[1]["outcome"] for e in events] == ["ok", "timeout", "cancelled"]


def test_an_abandoned_observed_coroutine_still_ends_its_scopes(recorded: Any) -> None:
    """A coroutine started in a task's context and closed elsewhere (a task abandoned, then
    garbage-collected) still finishes its scopes (span ended, gauge decremented)."""
    import contextvars
    from collections.abc import Generator

    class Pending:
        def __await__(self) -> Generator[None, None, None]:
            yield  # suspended until closed

    async def wait() -> None:
        await Pending()

    log, _ = recorded
    coro = metrics.observing("call", {"actor": "a"}, wait())
    contextvars.copy_context().run(coro.send, None)  # started in "the task's" context
    coro.close()  # closed in this one
    assert log == [("call", "error", "GeneratorExit")]
