"""Our client against a real django-ipc 1.0.9 server (run from its own venv, ``.venv-ipc``,
which ``make install`` creates: django-ipc pins redis<7 and websockets<16)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from pydantic import BaseModel

pytest.importorskip("websockets")
from websockets.asyncio.client import connect

from rpc_tasks import (
    BroadcastRequest,
    BroadcastResponse,
    NotificationRequest,
    NotificationResponse,
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    WebSocketRPCClient,
    WebSocketRPCConfig,
)

from .support import free_port, unique
from .wsproc import wait_healthy

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
IPC_PYTHON = Path(os.environ.get("RPC_TEST_IPC_PYTHON", ROOT / ".venv-ipc" / "bin" / "python"))
SECRET = "ipc-interop-secret-" + "z" * 16

SERVER = """
import asyncio, sys
from django_ipc.server import WebSocketServer, ServerConfig, WSServerConfig, HandlerConfig
host, port, health, url, stream, group, secret = sys.argv[1:8]
config = ServerConfig(
    server=WSServerConfig(host=host, port=int(port), health_port=int(health), redis_url=url,
                          request_stream=stream, consumer_group=group, jwt_secret=secret),
    handlers=HandlerConfig(),
)
asyncio.run(WebSocketServer(config).start())
"""


class Empty(BaseModel):
    pass


class IpcServer:
    def __init__(self, redis_url: str) -> None:
        if not IPC_PYTHON.exists():
            message = f"django-ipc's venv is missing ({IPC_PYTHON}); run `make install`"
            if os.environ.get("RPC_TASKS_REQUIRE_SERVICES") == "1":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        probe = redis.Redis.from_url(redis_url)
        #: Redis connections with a higher id were opened after this point (by the server).
        self.first_client_id = max(int(c["id"]) for c in probe.client_list()) + 1
        probe.close()
        self.port, self.health = free_port(), free_port()
        self.stream, group = unique("ipc:req"), unique("ipc_group")
        args = ["127.0.0.1", str(self.port), str(self.health), redis_url, self.stream, group, SECRET]
        self.proc = subprocess.Popen(
            [str(IPC_PYTHON), "-c", SERVER, *args],
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{self.health}/health", self.proc, "django-ipc server", 0.2)
        except RuntimeError:
            self.stop()
            raise
        time.sleep(1.5)  # its stream consumer starts after the health endpoint

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def ipc(redis_url: str) -> Iterator[IpcServer]:
    server = IpcServer(redis_url)
    yield server
    server.stop()


@pytest.fixture
def client(ipc: IpcServer, redis_url: str) -> Iterator[WebSocketRPCClient]:
    config = WebSocketRPCConfig(redis_url=redis_url, request_stream=ipc.stream)
    rpc = WebSocketRPCClient(config)
    yield rpc
    rpc.close()


async def browser(ipc: IpcServer, user: str) -> Any:
    ws = await connect(f"ws://127.0.0.1:{ipc.port}/")
    token = jwt.encode({"user_id": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    await ws.send(f"Bearer {token}")
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["status"] == "ok"
    return ws


async def next_frame(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_our_health_check_is_true_against_django_ipc(client: WebSocketRPCClient) -> None:
    started = time.monotonic()
    assert client.health_check(timeout=10) is True
    assert time.monotonic() - started < 10  # the system.ping fallback stays within the timeout


def test_our_notification_reaches_a_django_ipc_browser(ipc: IpcServer, client: WebSocketRPCClient) -> None:
    request = NotificationRequest(
        user_id="offline", notification_type="order_update", title="Order", message="confirmed"
    )
    offline = client.call("send_notification", request, NotificationResponse, timeout=10)
    assert (offline.delivered, offline.user_connected, offline.connections) == (False, False, 0)
    assert offline.error  # django-ipc says why

    async def scenario() -> None:
        ws = await browser(ipc, "alice")
        online = request.model_copy(update={"user_id": "alice", "data": {"order_id": 7}})
        result = await asyncio.to_thread(client.call, "send_notification", online, NotificationResponse, 10)
        assert result.delivered and result.user_connected and result.connection_count == 1
        frame = await next_frame(ws)
        assert frame["type"] == "notification" and frame["data"]["notification_type"] == "order_update"
        # fire-and-forget runs too (django-ipc still pushes a reply, which expires after 60 s)
        await asyncio.to_thread(client.fire_and_forget, "send_notification", online)
        assert (await next_frame(ws))["data"]["title"] == "Order"
        # our broadcast shape is written with title/message/type/data, which it requires
        bcast = BroadcastRequest(event_type="system_update", payload={"v": 2}, message="Maintenance at 5")
        reached = await asyncio.to_thread(client.call, "broadcast", bcast, BroadcastResponse, 10)
        assert reached.recipients == 1 and reached.target.value == "all"
        assert await next_frame(ws) == {"type": "broadcast", "data": "Maintenance at 5"}
        await ws.close()

    asyncio.run(scenario())


def test_django_ipc_errors_reach_us_as_remote_errors(client: WebSocketRPCClient) -> None:
    with pytest.raises(RPCRemoteError) as info:
        client.call("nope", Empty(), Empty, timeout=10)
    assert info.value.error.code is RPCErrorCode.INTERNAL_ERROR
    assert "Unknown RPC method" in info.value.error.message

    class Ping(BaseModel):
        delay_ms: int

    with pytest.raises(RPCRemoteError) as info:  # its repr-of-a-dict error text, read back
        client.call("system.ping", Ping(delay_ms=99999), Empty, timeout=10)
    assert info.value.error.code is RPCErrorCode.VALIDATION_ERROR
    assert "delay_ms" in info.value.error.message


def test_what_django_ipc_never_does(ipc: IpcServer, client: WebSocketRPCClient) -> None:
    # It sends no reply when its error text would be over 500 characters: a title over its 200
    # characters (ours allows 1024) fails validation with the title echoed in the text.
    request = NotificationRequest(
        user_id="42", notification_type="order_update", title="T" * 600, message="M"
    )
    with pytest.raises(RPCTimeoutError):
        client.call("send_notification", request, NotificationResponse, timeout=3)
    # It subscribes to no Pub/Sub channel (so a PUBLISH broadcast reaches nobody): none of the
    # connections opened since it started (its own, and this test's) is subscribed to anything.
    db = int(client.redis.connection_pool.connection_kwargs.get("db", 0))
    opened = [
        c
        for c in client.redis.client_list()
        if int(c["id"]) >= ipc.first_client_id and int(c.get("db", -1)) == db
    ]
    assert len(opened) > 1 and all(int(c.get("sub", 0)) + int(c.get("psub", 0)) == 0 for c in opened)
