"""Browsers of either family against ``rpc-tasks ws``: django-ipc's login and frames (written
from django-ipc 1.0.9's documented behaviour) and our native ones, with standard JWTs."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import jwt
import pytest

pytest.importorskip("websockets")
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rpc_tasks import (
    BroadcastRequest,
    BroadcastResponse,
    NotificationRequest,
    WebSocketRPCClient,
    WebSocketRPCConfig,
)
from rpc_tasks.models.notifications import NotificationResponse

from .test_wsserver import SECRET, Instance, nothing_arrives, recv_json, welcome, ws_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def ipc_token(**claims: Any) -> str:
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def ipc_login(url: str, token: str) -> Any:
    ws = await connect(url)
    await ws.send(f"Bearer {token}")
    return ws


async def closed_with(ws: Any) -> tuple[int | None, str | None]:
    try:
        await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, None)
    return (None, "no close")


@pytest.fixture
def config(redis_url: str) -> WebSocketRPCConfig:
    # no bridge: a browser's call of a server method is answered method_not_found at once
    return ws_config(redis_url).model_copy(update={"enable_bridge": False})


@pytest.fixture
def inst(config: WebSocketRPCConfig) -> Any:
    instance = Instance(config, "--auth-timeout", "1.5")
    yield instance
    instance.stop()


def test_ipc_browser_logs_in_on_root_path_with_a_first_frame_jwt(inst: Instance) -> None:
    async def scenario() -> None:
        for path, claims in (
            ("/", {"user_id": 42}),
            ("/ws", {"sub": "u-sub"}),
            ("/ws/x?y=1", {"id": "u-id"}),
        ):
            ws = await ipc_login(f"ws://127.0.0.1:{inst.port}{path}", ipc_token(**claims))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame == {"type": "auth", "status": "ok", "server_version": frame["server_version"]}
            await ws.send(
                json.dumps({"type": "rpc", "method": "system.ping", "params": {}, "correlation_id": "1"})
            )
            answer = await recv_json(ws)
            assert answer["type"] == "response" and answer["correlation_id"] == "1"
            assert answer["result"]["pong"] == "ping" and answer["error"] is None
            await ws.close()

    asyncio.run(scenario())


def test_ipc_browser_failed_logins_close_with_1008(inst: Instance) -> None:
    url = f"ws://127.0.0.1:{inst.port}/"

    async def scenario() -> None:
        bad = [
            "Bearer " + jwt.encode({"user_id": 1}, "another-secret-of-32-bytes-length", algorithm="HS256"),
            "Bearer " + ipc_token(user_id=1, exp=int(time.time()) - 60),
            "Bearer " + ipc_token(name="no user claim"),
            ipc_token(user_id=1),  # no "Bearer"
            json.dumps({"type": "auth", "token": ipc_token(user_id=1)}),
        ]
        for first in bad:
            ws = await connect(url)
            await ws.send(first)
            assert await closed_with(ws) == (1008, "Authentication failed"), first
        ws = await connect(url)  # says nothing
        assert await closed_with(ws) == (1008, "Authentication timeout")

    asyncio.run(scenario())


def test_ipc_browser_gets_ipc_frames_and_rooms(inst: Instance, config: WebSocketRPCConfig) -> None:
    client = WebSocketRPCClient(config)

    async def scenario() -> None:
        ws = await ipc_login(f"ws://127.0.0.1:{inst.port}/", ipc_token(user_id="alice"))
        assert json.loads(await ws.recv())["type"] == "auth"
        request = NotificationRequest(
            user_id="alice",
            notification_type="order_update",
            title="Hi",
            message="Body",
            data={"order_id": 7},
        )
        result = await asyncio.to_thread(client.call, "send_notification", request, NotificationResponse, 10)
        assert result.delivered and result.connections == 1
        frame = await recv_json(ws)
        assert frame == {
            "type": "notification",
            "data": {
                "notification_type": "order_update",
                "title": "Hi",
                "message": "Body",
                "data": {"order_id": 7},
                "priority": "normal",
            },
        }
        await ws.send(
            json.dumps(
                {"type": "rpc", "method": "join_room", "params": {"room": "r1"}, "correlation_id": "8"}
            )
        )
        assert await recv_json(ws) == {
            "type": "response",
            "correlation_id": "8",
            "result": {"room": "r1", "joined": True},
            "error": None,
        }
        bcast = BroadcastRequest(
            target="room", room="r1", event_type="news", title="T", message="In the room"
        )
        reached = await asyncio.to_thread(client.call, "broadcast", bcast, BroadcastResponse, 10)
        assert reached.recipients == 1
        assert await recv_json(ws) == {"type": "broadcast", "data": "In the room"}
        await ws.send(
            json.dumps(
                {"type": "rpc", "method": "leave_room", "params": {"room": "r1"}, "correlation_id": "9"}
            )
        )
        assert (await recv_json(ws))["result"] == {"room": "r1", "left": True}
        # errors: django-ipc's shape and codes
        await ws.send(
            json.dumps(
                {"type": "rpc", "method": "system.ping", "params": {"delay_ms": 99999}, "correlation_id": "2"}
            )
        )
        error = await recv_json(ws)
        assert error["type"] == "error" and error["correlation_id"] == "2" and error["result"] is None
        assert error["error"]["code"] == "validation_error" and error["error"]["validation_errors"]
        await ws.send(
            json.dumps({"type": "rpc", "method": "send_notification", "params": {}, "correlation_id": "3"})
        )
        error = await recv_json(ws)  # browsers never reach the server's own methods
        assert error["error"]["code"] == "method_not_found" and error["correlation_id"] == "3"
        await ws.send(json.dumps({"type": "subscribe"}))
        assert (await recv_json(ws))["error"]["code"] == "method_not_found"
        await ws.send("not json")
        assert (await recv_json(ws))["error"]["code"] == "invalid_params"
        await ws.close()

    asyncio.run(scenario())


def test_native_logins_keep_native_frames_with_jwts(inst: Instance) -> None:
    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{inst.port}/ws?token={ipc_token(user_id='n1')}") as ws:
            assert (await welcome(ws))["payload"]["user_id"] == "n1"
        headers = {"Authorization": f"Bearer {ipc_token(sub='n2')}"}
        async with connect(f"ws://127.0.0.1:{inst.port}/", additional_headers=headers) as ws:
            assert (await welcome(ws))["payload"]["user_id"] == "n2"
            await ws.send(json.dumps({"type": "ping", "id": "p"}))
            pong = await recv_json(ws)
            assert set(pong) == {"type", "id", "payload", "timestamp"} and pong["type"] == "pong"
            assert await nothing_arrives(ws, 0.2)

    asyncio.run(scenario())


def test_http_health_json_and_demo_page_without_upgrade(inst: Instance) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.port}/health", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        body = json.loads(response.read())
    assert body["status"] == "ok" and body["connections"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.port}/", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/html")
