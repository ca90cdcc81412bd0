"""The WebSocket server's documented limits and auth paths, against real server processes:
``Authorization: Bearer``, ``send_batch_notifications``, 8 bridge requests in flight per
socket, close code 4008 for a reader that falls behind."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading

import pytest

pytest.importorskip("websockets")  # a failure under --require-services (tests/conftest.py)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rpc_tasks import BroadcastRequest, RPCServer, WebSocketRPCClient, WebSocketRPCConfig
from rpc_tasks.websocket.auth import make_token
from rpc_tasks.websocket.models import BridgeParams

from .test_wsserver import SECRET, Instance, WhoAmI, config, instances, recv_json, welcome

pytestmark = [pytest.mark.redis, pytest.mark.slow]
__all__ = ["config", "instances"]  # fixtures shared with test_wsserver.py


def test_authorization_bearer_header_authenticates(config: WebSocketRPCConfig, instances: list) -> None:
    """``Authorization: Bearer <token>`` works like ``?token=``; a forged one is refused (4401)."""
    inst = Instance(config)
    instances.append(inst)
    url = f"ws://127.0.0.1:{inst.port}/ws"

    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {make_token('bearer-user', SECRET)}"}
        async with connect(url, additional_headers=headers) as ws:
            hello = await welcome(ws)
            assert hello["payload"]["user_id"] == "bearer-user"
        forged = {"Authorization": f"Bearer {make_token('bearer-user', 'another-secret')}"}
        async with connect(url, additional_headers=forged) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4401
            assert "bad signature" in info.value.rcvd.reason

    asyncio.run(scenario())


def test_send_batch_notifications_reports_delivered_and_offline(
    config: WebSocketRPCConfig, instances: list
) -> None:
    from rpc_tasks import BatchNotificationRequest, BatchNotificationResponse

    inst = Instance(config)
    instances.append(inst)
    client = WebSocketRPCClient(config)

    async def scenario() -> None:
        async with connect(inst.url("ann")) as ann, connect(inst.url("bob")) as bob:
            await welcome(ann)
            await welcome(bob)
            request = BatchNotificationRequest(
                user_ids=["ann", "bob", "gone", "ann"],
                notification_type="promo",
                title="Sale",
                message="-50%",
            )
            result = await asyncio.to_thread(
                client.call, "send_batch_notifications", request, BatchNotificationResponse, 10
            )
            assert (result.total, result.delivered, result.failed) == (3, 2, 1)
            assert sorted(result.delivered_user_ids) == ["ann", "bob"] and result.offline_user_ids == ["gone"]
            for ws, user in ((ann, "ann"), (bob, "bob")):
                frame = await recv_json(ws)
                assert frame["type"] == "notification" and frame["payload"]["user_id"] == user
                assert frame["payload"]["title"] == "Sale"

    asyncio.run(scenario())


def test_ninth_bridge_request_in_flight_is_refused(config: WebSocketRPCConfig, instances: list) -> None:
    """At most 8 bridge requests in flight per socket: the 9th and 10th get a
    ``rate_limit_exceeded`` error frame at once; the 8 others are answered once released."""
    inst = Instance(config)
    instances.append(inst)
    release = threading.Event()
    django_side = RPCServer(
        config, stream=config.bridge_stream, group=config.bridge_consumer_name, concurrency=16
    )

    @django_side.method("hold")
    def hold(params: BridgeParams) -> WhoAmI:
        release.wait(20)
        return WhoAmI(user_id=params.user_id, connection_id=params.connection_id, data=params.data)

    django_side.start()
    try:

        async def scenario() -> None:
            async with connect(inst.url("busy")) as ws:
                await welcome(ws)
                for i in range(10):
                    await ws.send(
                        json.dumps({"type": "request", "id": f"r{i}", "method": "hold", "params": {}})
                    )
                refused = [await recv_json(ws, 10), await recv_json(ws, 10)]
                assert [f["type"] for f in refused] == ["error", "error"], refused
                assert sorted(f["id"] for f in refused) == ["r8", "r9"]
                assert all(f["payload"]["code"] == "rate_limit_exceeded" for f in refused)
                release.set()
                answered = [await recv_json(ws, 20) for _ in range(8)]
                assert sorted(f["id"] for f in answered) == [f"r{i}" for i in range(8)]
                assert all(f["type"] == "response" for f in answered), answered

        asyncio.run(scenario())
    finally:
        release.set()
        django_side.stop(10)


def _raw_ws_connect(port: int, token: str) -> socket.socket:
    """A WebSocket handshake on a plain socket with a small receive buffer, so that not reading
    from it really stops the server's writes (client libraries keep reading into memory)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _close_code_after_frames(sock: socket.socket) -> tuple[int | None, int]:
    """Read server frames until a close frame: (its code, data frames before it)."""
    buf = b""
    count = 0

    def need(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"connection ended after {count} frames without a close frame")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    while True:
        first, second = need(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", need(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", need(8))[0]
        payload = need(length)
        if first & 0x0F == 0x8:
            return (struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None), count
        count += 1


def test_slow_reader_is_closed_with_4008(config: WebSocketRPCConfig, instances: list) -> None:
    """A socket that stops reading fills its send queue (256 frames) and is closed with 4008;
    a reading socket on the same instance gets every frame and stays connected."""
    inst = Instance(config)
    instances.append(inst)
    client = WebSocketRPCClient(config)
    blob = "x" * 32_000
    total = 600  # ~19 MB: far past the send queue plus the socket buffers
    slow = _raw_ws_connect(inst.port, make_token("slow", SECRET))

    async def scenario() -> None:
        async with connect(inst.url("probe"), max_size=None) as probe:
            await welcome(probe)
            for _ in range(total):
                reached = await asyncio.to_thread(
                    client.broadcast,
                    config.broadcast_channel,
                    BroadcastRequest(event_type="bulk", payload={"blob": blob}),
                )
                assert reached == 1, "the instance listens on the broadcast channel"
            # The probe got every broadcast: the server has offered them all to "slow" too.
            for _ in range(total):
                assert (await recv_json(probe, 30))["type"] == "broadcast"
            code, frames_read = await asyncio.to_thread(_close_code_after_frames, slow)
            assert code == 4008, (code, frames_read)
            assert frames_read < total - 256, "frames past the full queue were dropped, not buffered"
            await probe.send(json.dumps({"type": "ping", "id": "p"}))
            assert (await recv_json(probe))["type"] == "pong"

    try:
        asyncio.run(scenario())
    finally:
        slow.close()
