"""The example Django project: system checks, rundramatiq, views through real workers, the
WebSocket path, management commands, and the test helpers used the way a user would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from django.conf import settings
from django.core.checks import ERROR, WARNING
from django.core.management import call_command
from django.test import Client, SimpleTestCase, override_settings
from dramatiq.brokers.stub import StubBroker

from notifications.tasks import AddParams, NotifyParams, add, send_async_notification
from rpc_tasks import NotificationResponse, RPCErrorCode, RPCRemoteError, RPCTimeoutError
from rpc_tasks.contrib.django.checks import check_dramatiq_broker, check_rpc_settings
from rpc_tasks.testing import FakeRPCClient, InlineRunner, RPCTestCaseMixin
from rpc_tasks.websocket.auth import make_token

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "examples" / "django_project"


def _ids(problems: list[Any], level: int = ERROR) -> set[str]:
    return {p.id for p in problems if p.level >= level}


# -- system checks -------------------------------------------------------------------------------


def test_system_checks_pass_for_the_example_project(redis_url: str) -> None:
    call_command("check", fail_level="WARNING")
    assert check_rpc_settings() == [] and check_dramatiq_broker() == []


def test_system_checks_report_misconfiguration(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = dict(settings.DRAMATIQ_BROKER)
    with override_settings(DRAMATIQ_BROKER={k: v for k, v in broker.items() if k != "MIDDLEWARE"}):
        assert "rpc_tasks.E004" in _ids(check_dramatiq_broker())
    with override_settings(
        DRAMATIQ_BROKER={**broker, "MIDDLEWARE": ["dramatiq.middleware.Prometheus", *broker["MIDDLEWARE"]]}
    ):
        assert "rpc_tasks.E005" in _ids(check_dramatiq_broker())
    real = dramatiq.get_broker()
    dramatiq.set_broker(StubBroker())  # what a hand-made broker without our middleware looks like
    try:
        problems = check_dramatiq_broker()
        assert "rpc_tasks.E006" in _ids(problems)
        assert any("RPCReplies" in p.msg for p in problems)
    finally:
        dramatiq.set_broker(real)
    with override_settings(WEBSOCKET_RPC={**settings.WEBSOCKET_RPC, "redis_url": "http://wrong"}):
        assert "rpc_tasks.E001" in _ids(check_rpc_settings())
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("WEBSOCKET_RPC_REDIS_URL", raising=False)
    with override_settings(WEBSOCKET_RPC=None):
        assert "rpc_tasks.E002" in _ids(check_rpc_settings())
    with override_settings(DRAMATIQ_ENCODER="dramatiq.encoder.JSONEncoder"):
        assert "rpc_tasks.W001" in _ids(check_dramatiq_broker(), WARNING)


def test_system_check_e003_without_django_dramatiq() -> None:
    apps = [a for a in settings.INSTALLED_APPS if a != "django_dramatiq"]
    with override_settings(INSTALLED_APPS=apps):
        problems = check_dramatiq_broker()
    assert _ids(problems) == {"rpc_tasks.E003"}
    assert "django_dramatiq" in problems[0].msg and "INSTALLED_APPS" in problems[0].msg
    assert "rpc_tasks.E003" not in _ids(check_dramatiq_broker())  # installed again: no E003


def test_broker_built_by_django_dramatiq_has_our_middleware_and_no_prometheus() -> None:
    names = [type(m).__name__ for m in dramatiq.get_broker().middleware]
    assert names[:2] == ["RPCReplies", "RPCRateLimits"] and "RPCRetries" in names
    assert "Retries" not in names and "Prometheus" not in names
    assert "DbConnectionsMiddleware" in names


# -- real processes ------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "project.test_settings",
            "PYTHONPATH": os.pathsep.join([str(PROJECT), str(ROOT)]),
            "REDIS_URL": os.environ["REDIS_URL"],
            "RPC_EXAMPLE_PREFIX": os.environ["RPC_EXAMPLE_PREFIX"],
            "WEBSOCKET_RPC_REDIS_URL": os.environ["REDIS_URL"],
            "WEBSOCKET_RPC_REQUEST_STREAM": settings.WEBSOCKET_RPC["request_stream"],
            "WEBSOCKET_RPC_CONSUMER_GROUP": settings.WEBSOCKET_RPC["consumer_group"],
            "WEBSOCKET_RPC_RESPONSE_KEY_PREFIX": settings.WEBSOCKET_RPC["response_key_prefix"],
            "WEBSOCKET_RPC_BRIDGE_STREAM": settings.WEBSOCKET_RPC["bridge_stream"],
            "WEBSOCKET_RPC_BROADCAST_CHANNEL": settings.WEBSOCKET_RPC["broadcast_channel"],
            "WEBSOCKET_RPC_WEBSOCKET_SECRET": settings.WEBSOCKET_RPC["websocket_secret"],
            "WEBSOCKET_RPC_ENABLE_BRIDGE": "true",
        }
    )
    env.update(extra)
    return env


class Proc:
    def __init__(self, *cmd: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=PROJECT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the main process stops its children itself
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def worker(redis_url: str) -> Iterator[Proc]:
    proc = Proc(
        sys.executable,
        "manage.py",
        "rundramatiq",
        "--processes",
        "1",
        "--threads",
        "2",
        "--worker-shutdown-timeout",
        "5000",
        env=_env(),
    )
    deadline = time.monotonic() + 60
    while True:  # wait until the worker answers
        try:
            add.call(AddParams(a=0, b=0), timeout=1)
            break
        except RPCTimeoutError:
            if time.monotonic() > deadline or proc.proc.poll() is not None:
                proc.stop()
                raise RuntimeError("rundramatiq did not come up") from None
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def ws_server(redis_url: str) -> Iterator[int]:
    from tests.integration.wsproc import WSServer

    server = WSServer(None, env=_env(), cwd=PROJECT, stderr=subprocess.DEVNULL)
    yield server.port
    server.stop()


def test_rundramatiq_runs_rpc_actors_and_views_call_them(worker: Proc) -> None:
    assert add.call(AddParams(a=2, b=3), timeout=5).total == 5
    response = Client().get("/add/", {"a": 2, "b": 40})
    assert response.status_code == 200 and response.json() == {"total": 42}


def test_async_view_awaits_acall_through_the_worker(worker: Proc) -> None:
    from django.test import AsyncClient

    from rpc_tasks import aclose_loop_connections

    async def scenario() -> list[Any]:
        try:
            client = AsyncClient()
            responses = await asyncio.gather(*(client.get("/add-async/", {"a": i, "b": 1}) for i in range(5)))
            return [(r.status_code, r.json()) for r in responses]
        finally:
            await aclose_loop_connections()

    assert asyncio.run(scenario()) == [(200, {"total": i + 1}) for i in range(5)]


def test_seed_quick_start_view_and_background_task_reach_the_browser(worker: Proc, ws_server: int) -> None:
    from websockets.asyncio.client import connect

    token = make_token("alice", settings.WEBSOCKET_RPC["websocket_secret"])

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{ws_server}/ws?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            response = await asyncio.to_thread(Client().get, "/notify/alice/")
            assert response.json() == {"delivered": True, "user_connected": True}
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame["type"] == "notification" and frame["payload"]["title"] == "Order Confirmed"
            queued = await asyncio.to_thread(Client().get, "/notify-async/alice/", {"m": "from a worker"})
            assert "queued" in queued.json()
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["payload"]["message"] == "from a worker"
            assert frame["payload"]["title"] == "Event Notification"

    asyncio.run(scenario())
    offline = Client().get("/notify/nobody/")
    assert offline.json() == {"delivered": False, "user_connected": False}


def test_rpc_serve_bridge_answers_browser_requests(ws_server: int, tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    env = _env(DJANGO_DB=str(tmp_path / "bridge.sqlite3"))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=PROJECT, env=env, check=True
    )
    bridge = Proc(sys.executable, "manage.py", "rpc_serve", "--bridge", env=env)
    token = make_token("carol", settings.WEBSOCKET_RPC["websocket_secret"])
    try:

        async def scenario() -> dict[str, Any]:
            async with connect(f"ws://127.0.0.1:{ws_server}/ws?token={token}") as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "request", "id": "q1", "method": "whoami", "params": {}}))
                return json.loads(await asyncio.wait_for(ws.recv(), 20))

        frame = asyncio.run(scenario())
    finally:
        assert bridge.stop() == 0
    assert frame["type"] == "response" and frame["id"] == "q1"
    assert frame["payload"]["result"]["user_id"] == "carol"
    assert frame["payload"]["result"]["known_user"] is False


@pytest.mark.slow
def test_rpc_serve_without_bridge_serves_the_request_stream(redis_url: str, tmp_path: Path) -> None:
    """``manage.py rpc_serve`` (no ``--bridge``) serves the ``@rpc_method`` handlers of each
    app's ``rpc.py`` from ``request_stream``, and not from ``bridge_stream``."""
    from notifications.rpc import WhoAmI
    from rpc_tasks import WebSocketRPCClient, WebSocketRPCConfig
    from rpc_tasks.streams.io import StreamIO
    from rpc_tasks.websocket.models import BridgeParams

    env = _env(DJANGO_DB=str(tmp_path / "serve.sqlite3"))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=PROJECT, env=env, check=True
    )
    server = Proc(sys.executable, "manage.py", "rpc_serve", env=env)
    config = WebSocketRPCConfig.model_validate(settings.WEBSOCKET_RPC)
    client = WebSocketRPCClient(config)
    try:
        params = BridgeParams(user_id="dave", connection_id="c-1", data={})
        result = client.call("whoami", params, WhoAmI, timeout=60)  # waits for the server to start
        assert result.user_id == "dave" and result.known_user is False
        assert StreamIO(client.redis).backlog(config.request_stream, config.consumer_group)[0] == 0
        assert not client.redis.exists(config.bridge_stream), "nothing read from (or made) the bridge stream"
    finally:
        assert server.stop() == 0
        client.close()


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_django_project_on_rabbitmq(redis_url: str) -> None:
    """``dramatiq_broker_settings("amqp://...")``: the example project's ``rundramatiq`` worker
    and a caller in another process run ``.call()`` over RabbitMQ (replies over Redis)."""
    import pika

    from tests.conftest import AMQP_URL, _reachable

    if not _reachable(AMQP_URL, 5672):
        pytest.skip(f"RabbitMQ is not reachable at {AMQP_URL}")  # --require-services: a failure
    env = _env(DRAMATIQ_BROKER_URL=AMQP_URL)
    worker = Proc(sys.executable, "manage.py", "rundramatiq", "--processes", "1", "--threads", "2", env=env)
    caller = (
        "import dramatiq; from notifications.tasks import add, AddParams; "
        "print(type(dramatiq.get_broker()).__name__, add.call(AddParams(a=20, b=22), timeout=60).total)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", caller],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        assert worker.stop() == 0
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for name in ("notifications", "notifications.DQ", "notifications.XQ"):
            channel.queue_delete(name)
        connection.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].split() == ["RabbitmqBroker", "42"], done.stdout


def test_rpc_health_command(redis_url: str, ws_server: int, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        call_command("rpc_health", "--timeout", "5")
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    assert "OK   redis (replies)" in out and "OK   server ping" in out and "OK   dramatiq broker" in out


def test_rpc_health_fails_without_a_server(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        call_command("rpc_health", "--timeout", "0.5")
    out = capsys.readouterr().out
    assert info.value.code == 1 and "FAIL server ping" in out and "unhealthy" in out
    with pytest.raises(SystemExit) as info:
        call_command("rpc_health", "--skip-server")
    assert info.value.code == 0


# -- test helpers, used the way a user would -------------------------------------------------------


class NotificationTaskTests(RPCTestCaseMixin, SimpleTestCase):
    def test_rate_limited_remote_is_retried_after_retry_after(self) -> None:
        self.fake_rpc.fails("send_notification", "rate_limit_exceeded", retry_after=2.5, times=2)
        self.fake_rpc.returns("send_notification", NotificationResponse(delivered=True, user_connected=True))
        result = send_async_notification.call(NotifyParams(user_id="u1", message="hi"), timeout=30)
        assert result.delivered
        times = [a.at_ms for a in self.rpc_inline.attempts]
        assert len(times) == 3 and times[1] - times[0] >= 2500 and times[2] - times[1] >= 2500
        assert self.fake_rpc.calls_to("send_notification")[0]["user_id"] == "u1"

    def test_deadline_returns_the_error_with_retry_after(self) -> None:
        self.fake_rpc.fails("send_notification", "service_unavailable", retry_after=10, times=5)
        with self.assertRaises(RPCRemoteError) as info:
            send_async_notification.call(NotifyParams(user_id="u1", message="hi"), timeout=5)
        assert info.exception.retry_after == 10 and len(self.rpc_inline.attempts) == 1

    def test_non_retryable_error_fails_at_once_and_send_runs_inline(self) -> None:
        self.fake_rpc.fails("send_notification", "user_not_connected", times=1)
        with self.assertRaises(RPCRemoteError) as info:
            send_async_notification.call(NotifyParams(user_id="u2", message="hi"))
        assert info.exception.error.code is RPCErrorCode.USER_NOT_CONNECTED
        assert len(self.rpc_inline.attempts) == 1
        self.fake_rpc.returns(
            "send_notification", NotificationResponse(delivered=False, user_connected=False)
        )
        send_async_notification.send(NotifyParams(user_id="u3", message="bg"))
        assert self.fake_rpc.calls_to("send_notification")[-1]["user_id"] == "u3"


def test_pytest_fixtures(rpc_inline: InlineRunner, fake_rpc: FakeRPCClient) -> None:
    fake_rpc.times_out("send_notification", times=1)
    fake_rpc.returns("send_notification", {"delivered": True, "user_connected": True})
    result = send_async_notification.call(NotifyParams(user_id="u4", message="x"), timeout=60)
    assert result.delivered and len(rpc_inline.attempts) == 2
    assert rpc_inline.attempts[0].error is not None
    assert rpc_inline.attempts[0].error.code is RPCErrorCode.TIMEOUT
