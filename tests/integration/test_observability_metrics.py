"""Prometheus metrics, scraped over HTTP and parsed with prometheus_client's parser after a
scripted workload: a real ``dramatiq`` worker (on Dramatiq's own exposition server), a real
``rpc-tasks serve --metrics-port`` and a real ``rpc-tasks ws --metrics-port``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc_tasks import (
    AsyncWebSocketRPCClient,
    RPCRemoteError,
    RPCServer,
    RPCTimeoutError,
    WebSocketRPCClient,
    WebSocketRPCConfig,
    aclose_loop_connections,
    protocol,
)

from .support import free_port, unique, wait_until

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples | None:
    """Every sample of ``http://127.0.0.1:port/metrics`` (``None`` while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_for(port: int, check: Any, timeout: float = 30) -> Samples:
    """Scrape until ``check(samples)`` holds; the last scrape."""
    last: list[Samples] = []

    def ok() -> bool:
        samples = scrape(port)
        if samples is None:
            return False
        last[:] = [samples]
        return bool(check(samples))

    try:
        wait_until(ok, timeout=timeout, interval=0.2)
    except AssertionError:
        got = {k: v for k, v in (last[0] if last else {}).items() if k[0].startswith("rpc_tasks")}
        raise AssertionError(f"metrics never matched; last rpc_tasks samples: {got}") from None
    return last[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def obs_app(redis_url: str) -> Any:
    from tests.integration import obs_app

    return obs_app


@pytest.fixture
def metrics_worker(redis_url: str, tmp_path: Path, obs_app: Any) -> Iterator[int]:
    """A worker with Dramatiq's Prometheus middleware and ours; yields the exposition port."""
    port = free_port()
    env = {
        **os.environ,
        "RPC_TEST_REDIS_URL": redis_url,
        "OBS_METRICS": "1",
        "dramatiq_prom_db": str(tmp_path / "prom"),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_port": str(port),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "tests.integration.obs_app", "--processes", "1", "--threads", "2"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        obs_app.echo.call(obs_app.EchoParams(message="warm-up"), timeout=60)
        yield port
    finally:
        stop(proc)


def test_worker_metrics_share_dramatiqs_endpoint(obs_app: Any, metrics_worker: int) -> None:
    from rpc_tasks.observability import prometheus

    prometheus.enable_metrics()  # the caller's side: this process
    before = prometheus.metrics_text()[0].decode()
    echo, params = obs_app.echo, obs_app.EchoParams
    for i in range(3):
        echo.call(params(message=str(i)), timeout=30)
    assert echo.call(params(message="r", fail_first=True), timeout=30).attempt == 2
    with pytest.raises(RPCRemoteError):
        obs_app.broken.call(params(message="x"), timeout=30)
    with pytest.raises(RPCTimeoutError):  # delivered after its deadline: skipped by the worker
        echo.call(params(message="late"), timeout=0.05, delay=300)
    obs_app.limited.send(params(message="cooldown", fail_first=True))

    samples = wait_for(
        metrics_worker,
        lambda s: (
            value(s, "rpc_tasks_worker_cooldowns_opened_total", actor="limited") >= 1
            and value(s, "rpc_tasks_worker_expired_skipped_total", actor="echo") >= 1
        ),
    )
    obs_app.limited.call(params(message="waits"), timeout=30)  # postponed by the cooldown, then runs
    samples = wait_for(
        metrics_worker,
        lambda s: (
            value(s, "rpc_tasks_worker_postponements_total", actor="limited", reason="cooldown") >= 1
            and value(s, "rpc_tasks_worker_attempts_total", actor="limited") >= 3
        ),
    )
    # Ours and Dramatiq's on one endpoint.
    assert value(samples, "dramatiq_messages_total", actor_name="echo") >= 5
    assert value(samples, "rpc_tasks_worker_attempts_total", actor="echo", queue=obs_app.QUEUE) == 6
    assert value(samples, "rpc_tasks_worker_retries_total", actor="echo", code="service_unavailable") == 1
    assert value(samples, "rpc_tasks_worker_retries_total", actor="limited", code="rate_limit_exceeded") == 1
    assert value(samples, "rpc_tasks_worker_gave_up_total", actor="broken", reason="non_retryable") == 1
    assert value(samples, "rpc_tasks_worker_dead_lettered_total", actor="broken") == 1
    assert value(samples, "rpc_tasks_worker_expired_skipped_total", actor="echo") == 1
    assert value(samples, "rpc_tasks_worker_cooldowns_opened_total", actor="limited") == 1
    assert value(samples, "rpc_tasks_worker_reply_push_failures_total") == 0

    # The caller's histogram (this process), by actor and outcome.
    after = prometheus.metrics_text()[0].decode()

    def count(text: str, **labels: str) -> float:
        families = text_string_to_metric_families(text)
        return sum(
            s.value
            for f in families
            for s in f.samples
            if s.name == "rpc_tasks_call_duration_seconds_count"
            and set(labels.items()) <= set(s.labels.items())
        )

    assert (
        count(after, actor="echo", kind="call", outcome="ok")
        - count(before, actor="echo", kind="call", outcome="ok")
        == 4
    )
    assert count(after, actor="echo", outcome="timeout") - count(before, actor="echo", outcome="timeout") == 1
    assert (
        count(after, actor="broken", outcome="invalid_request")
        - count(before, actor="broken", outcome="invalid_request")
        == 1
    )
    in_flight = [
        s.value
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.name == "rpc_tasks_calls_in_flight" and s.labels.get("actor") == "echo"
    ]
    assert in_flight == [0.0]


def caller_samples() -> Samples:
    """This process's metrics (the caller's side), parsed."""
    from rpc_tasks.observability import prometheus

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(prometheus.metrics_text()[0].decode())
        for s in family.samples
    }


def test_async_callers_metrics(obs_app: Any, metrics_worker: int, redis_url: str) -> None:
    """``acall`` / ``acall_many`` / ``asend`` and ``AsyncWebSocketRPCClient.call`` feed the same
    caller series as their sync twins: latency by kind and outcome, calls in flight, sends."""
    from rpc_tasks.observability import prometheus

    prometheus.enable_metrics()
    echo, broken, params = obs_app.echo, obs_app.broken, obs_app.EchoParams
    config = WebSocketRPCConfig(
        redis_url=redis_url,
        request_stream=unique("obs:astream"),
        consumer_group=unique("obs-agroup"),
        response_key_prefix=unique("obs:aresp") + ":",
    )
    server = RPCServer(config, concurrency=2)
    server.start()
    client = AsyncWebSocketRPCClient(config)
    before = caller_samples()
    in_flight: list[float] = []

    async def scenario() -> None:
        from rpc_tasks.streams.builtins import EchoParams, EchoResult

        for i in range(3):
            assert (await echo.acall(params(message=str(i)), timeout=30)).message == str(i)
        with pytest.raises(RPCTimeoutError):  # delivered after its deadline: skipped by the worker
            await echo.acall(params(message="late"), timeout=0.05, delay=300)
        with pytest.raises(RPCRemoteError):
            await broken.acall(params(message="x"), timeout=30)
        assert len(await echo.acall_many([params(message="a"), params(message="b")], timeout=30)) == 2
        failed = await broken.acall_many([params(message="y")], timeout=30, return_exceptions=True)
        assert isinstance(failed[0], RPCRemoteError)
        for _ in range(2):
            await echo.asend(params(message="bg"))
        # A call waiting for its reply (the worker gets the message 300 ms from now).
        waiting = asyncio.ensure_future(echo.acall(params(message="waits"), timeout=30, delay=300))
        await asyncio.sleep(0)
        in_flight.append(value(caller_samples(), "rpc_tasks_calls_in_flight", actor="echo", kind="call"))
        assert (await waiting).message == "waits"
        assert (await client.call("echo", EchoParams(message="s"), EchoResult, timeout=10)).message == "s"
        with pytest.raises(RPCRemoteError):
            await client.call("nope", EchoParams(message="s"), EchoResult, timeout=10)
        await aclose_loop_connections()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    after = caller_samples()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    count = "rpc_tasks_call_duration_seconds_count"
    assert delta(count, actor="echo", kind="call", outcome="ok") == 4
    assert delta(count, actor="echo", kind="call", outcome="timeout") == 1
    assert delta(count, actor="broken", kind="call", outcome="invalid_request") == 1
    assert delta(count, actor="echo", kind="call_many", outcome="ok") == 1
    assert delta(count, actor="broken", kind="call_many", outcome="invalid_request") == 1
    assert delta(count, actor="echo", kind="stream_call", outcome="ok") == 1
    assert delta(count, actor="nope", kind="stream_call", outcome="method_not_found") == 1
    assert delta("rpc_tasks_sends_total", actor="echo", outcome="ok") == 2
    assert in_flight == [1.0]
    assert value(after, "rpc_tasks_calls_in_flight", actor="echo", kind="call") == 0
    assert value(after, "rpc_tasks_calls_in_flight", actor="echo", kind="stream_call") == 0


def test_reply_push_failures_are_counted(obs_app: Any, metrics_worker: int, redis_url: str) -> None:
    """A reply the worker cannot push (its key holds a string: ``LPUSH`` fails with WRONGTYPE)
    is counted, a success reply (pushed with the ack) and an error reply (dead letter) alike."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = []
    for actor in (obs_app.echo, obs_app.broken):
        key = obs_app.config.response_key_prefix + unique("taken")
        client.set(key, "not a list")
        message = actor.message_with_options(args=(obs_app.EchoParams(message="x"),))
        message.options[protocol.OPTION_REPLY_TO] = key
        message.options[protocol.OPTION_DEADLINE] = protocol.deadline_from_timeout(60, time.time())
        obs_app.broker.enqueue(message)
        keys.append(key)
    name = "rpc_tasks_worker_reply_push_failures_total"
    samples = wait_for(
        metrics_worker,
        lambda s: value(s, name, actor="echo") >= 1 and value(s, name, actor="broken") >= 1,
    )
    assert value(samples, name, actor="echo") == 1
    assert value(samples, name, actor="broken") == 1
    assert [client.get(key) for key in keys] == [b"not a list"] * 2
    client.close()


def test_rpc_tasks_serve_metrics_port(redis_url: str) -> None:
    from rpc_tasks.streams.builtins import EchoParams, EchoResult

    stream, prefix, port = unique("obs:req"), unique("obs:resp") + ":", free_port()
    env = {
        **os.environ,
        "RPC_TEST_REDIS_URL": redis_url,
        "STREAM_APP_STREAM": stream,
        "STREAM_APP_PREFIX": prefix,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rpc_tasks.cli",
            "serve",
            "--app",
            "tests.integration.stream_app:server",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = WebSocketRPCClient(
        WebSocketRPCConfig(redis_url=redis_url, request_stream=stream, response_key_prefix=prefix)
    )
    try:
        wait_until(lambda: client.health_check(timeout=2), timeout=30)
        for i in range(4):
            assert client.call("echo", EchoParams(message=str(i)), EchoResult, timeout=10).message == str(i)
        with pytest.raises(RPCRemoteError):
            client.call("nope", EchoParams(message="x"), EchoResult, timeout=10)
        with pytest.raises(RPCRemoteError):
            client.call("work", EchoParams(message="bad params"), EchoResult, timeout=10)
        client.redis.xadd(stream, {"payload": b"not json"})  # dead-lettered by the server
        samples = wait_for(
            port,
            lambda s: (
                value(s, "rpc_tasks_server_requests_total", method="echo", outcome="ok") == 4
                and value(s, "rpc_tasks_server_dead_lettered_total", stream=stream) == 1
                and ("rpc_tasks_server_pending", frozenset({("stream", stream), ("group", "rpc_group")})) in s
            ),
        )
    finally:
        client.close()
        stop(proc)
    assert value(samples, "rpc_tasks_server_requests_total", method="nope", outcome="method_not_found") == 1
    assert value(samples, "rpc_tasks_server_requests_total", method="work", outcome="validation_error") == 1
    assert value(samples, "rpc_tasks_server_requests_total", method="ping", outcome="ok") >= 1
    assert value(samples, "rpc_tasks_server_request_duration_seconds_count", method="echo") == 4
    assert value(samples, "rpc_tasks_server_requests_in_flight", method="echo") == 0
    assert value(samples, "rpc_tasks_server_pending", stream=stream) == 0


def test_rpc_tasks_ws_metrics_port(redis_url: str) -> None:
    """Two instances: A serves the request stream, alice's socket is on B (--no-rpc), so A
    fans the notification out to B and waits for B's ack."""
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect

    from rpc_tasks import NotificationRequest, NotificationResponse

    from .test_wsserver import Instance, recv_json, ws_config

    config = ws_config(redis_url)
    port_a, port_b = free_port(), free_port()
    a = Instance(
        config, "--instance-id", "obs-a", "--metrics-port", str(port_a), "--metrics-host", "127.0.0.1"
    )
    b = Instance(
        config,
        "--instance-id",
        "obs-b",
        "--no-rpc",
        "--metrics-port",
        str(port_b),
        "--metrics-host",
        "127.0.0.1",
    )
    client = WebSocketRPCClient(config)
    try:

        async def scenario() -> None:
            async with connect(b.url("alice")) as ws:
                assert (await recv_json(ws))["type"] == "welcome"
                wait_for(port_b, lambda s: value(s, "rpc_tasks_ws_connections", instance="obs-b") == 1)
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    None,
                    lambda: client.call(
                        "send_notification",
                        NotificationRequest(user_id="alice", notification_type="t", title="T", message="m"),
                        NotificationResponse,
                        timeout=10,
                    ),
                )
                assert result.delivered
                assert (await recv_json(ws))["type"] == "notification"
                for _ in range(80):  # over the burst (40): some are refused
                    await ws.send('{"type": "ping"}')
                await asyncio.sleep(0.5)

        asyncio.run(scenario())
        on_b = wait_for(port_b, lambda s: value(s, "rpc_tasks_ws_connections", instance="obs-b") == 0)
        on_a = wait_for(port_a, lambda s: value(s, "rpc_tasks_ws_fanout_acks_received_total") >= 1)
    finally:
        client.close()
        a.stop()
        b.stop()
    assert value(on_b, "rpc_tasks_ws_frames_delivered_total", instance="obs-b") == 1
    assert value(on_b, "rpc_tasks_ws_frames_offered_total", instance="obs-b") == 1
    assert value(on_b, "rpc_tasks_ws_rate_limited_frames_total", instance="obs-b") >= 1
    assert value(on_a, "rpc_tasks_ws_fanout_acks_expected_total", instance="obs-a") == 1
    assert value(on_a, "rpc_tasks_ws_fanout_acks_received_total", instance="obs-a") == 1
    assert value(on_a, "rpc_tasks_ws_connections", instance="obs-a") == 0
    assert value(on_a, "rpc_tasks_server_requests_total", method="send_notification", outcome="ok") == 1
