"""The WebSocket server: real server processes, real Redis, real ``websockets`` clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

pytest.importorskip("websockets")
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rpc_tasks import (
    BroadcastRequest,
    BroadcastResponse,
    NotificationRequest,
    NotificationResponse,
    RPCErrorCode,
    RPCRemoteError,
    RPCServer,
    WebSocketRPCClient,
    WebSocketRPCConfig,
)
from rpc_tasks.websocket.auth import make_token
from rpc_tasks.websocket.models import (
    BridgeParams,
    PresenceQuery,
    PresenceResponse,
    RoomRequest,
    RoomResponse,
)

from .support import PrivateRedis, free_port, unique, wait_until
from .wsproc import WSServer, recv_json, welcome
from .wsproc import ws_config as shared_ws_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret-" + "x" * 16


@pytest.fixture
def config(redis_url: str) -> WebSocketRPCConfig:
    return ws_config(redis_url)


def ws_config(redis_url: str) -> WebSocketRPCConfig:
    """Settings of a test's ws server: its own streams, keys and channels."""
    return shared_ws_config(redis_url, SECRET)


class Instance(WSServer):
    def __init__(
        self, config: WebSocketRPCConfig, *extra: str, presence_ttl: int = 30, log: Any = None
    ) -> None:
        super().__init__(config, "--presence-ttl", str(presence_ttl), *extra, stderr=log)

    def url(self, user: str | None, token: str | None = None) -> str:
        token = token if token is not None else make_token(user or "", SECRET)
        return f"ws://127.0.0.1:{self.port}/ws?token={token}"


@pytest.fixture
def instances(config: WebSocketRPCConfig) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for inst in started:
        inst.stop()


async def nothing_arrives(ws: Any, seconds: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return True
    return False


def notify(client: WebSocketRPCClient, user: str, **kw: Any) -> NotificationResponse:
    req = NotificationRequest(
        user_id=user, notification_type="order_update", title="Order", message="confirmed", **kw
    )
    return client.call("send_notification", req, NotificationResponse, timeout=10)


def test_notification_reaches_only_its_user_and_offline_users(
    config: WebSocketRPCConfig, instances: list
) -> None:
    inst = Instance(config)
    instances.append(inst)
    client = WebSocketRPCClient(config)

    async def scenario() -> None:
        async with connect(inst.url("42")) as ws42, connect(inst.url("43")) as ws43:
            await welcome(ws42)
            await welcome(ws43)
            result = await asyncio.to_thread(notify, client, "42")
            assert result.delivered and result.user_connected and result.connection_count == 1
            frame = await recv_json(ws42)
            assert set(frame) == {"type", "id", "payload", "timestamp"}
            assert frame["type"] == "notification" and frame["id"] == result.notification_id
            assert frame["payload"]["title"] == "Order" and frame["payload"]["user_id"] == "42"
            assert await nothing_arrives(ws43)

    asyncio.run(scenario())
    offline = notify(client, "nobody")
    assert offline.delivered is False and offline.user_connected is False
    with pytest.raises(RPCRemoteError) as info:
        notify(client, "nobody", require_connected=True)
    assert info.value.error.code is RPCErrorCode.USER_NOT_CONNECTED


def test_two_instances_fan_out_broadcast_rooms_and_presence(
    config: WebSocketRPCConfig, instances: list
) -> None:
    a = Instance(config)
    b = Instance(config, "--no-rpc", presence_ttl=2)  # only A consumes the request stream
    instances.extend([a, b])
    client = WebSocketRPCClient(config)
    # A's Streams consumer is up (the listener can come first on a busy machine).
    assert wait_until(lambda: client.health_check(timeout=2), timeout=30)

    async def scenario() -> None:
        async with connect(b.url("7")) as on_b, connect(a.url("8")) as on_a, connect(a.url("9")) as other:
            for ws in (on_b, on_a, other):
                await welcome(ws)
            # a notification consumed by A reaches the user connected to B
            result = await asyncio.to_thread(notify, client, "7")
            assert result.delivered and result.user_connected
            assert (await recv_json(on_b))["type"] == "notification"
            # broadcast() from Django: a plain PUBLISH, counted per server instance
            count = await asyncio.to_thread(
                client.broadcast,
                config.broadcast_channel,
                BroadcastRequest(event_type="deploy", payload={"v": 2}),
            )
            assert count == 2
            for ws in (on_b, on_a, other):
                frame = await recv_json(ws)
                assert frame["type"] == "broadcast" and frame["payload"]["payload"] == {"v": 2}
            # rooms, across instances
            for user in ("7", "8"):
                joined = await asyncio.to_thread(
                    client.call, "join_room", RoomRequest(user_id=user, room="lobby"), RoomResponse, 10
                )
            assert joined.members == 2
            sent = await asyncio.to_thread(
                client.call,
                "broadcast",
                BroadcastRequest(target="room", room="lobby", event_type="chat", payload={"text": "hi"}),
                BroadcastResponse,
                10,
            )
            assert sent.recipients == 2 and sent.users == 2
            assert (await recv_json(on_b))["payload"]["room"] == "lobby"
            assert (await recv_json(on_a))["payload"]["event_type"] == "chat"
            assert await nothing_arrives(other)
            left = await asyncio.to_thread(
                client.call, "leave_room", RoomRequest(user_id="7", room="lobby"), RoomResponse, 10
            )
            assert left.members == 1
            sent = await asyncio.to_thread(
                client.call,
                "broadcast",
                BroadcastRequest(target="room", room="lobby", event_type="chat", payload={}),
                BroadcastResponse,
                10,
            )
            assert sent.recipients == 1
            await recv_json(on_a)
            assert await nothing_arrives(on_b)
            # presence is real, and a dead instance's users go offline by themselves
            presence = await asyncio.to_thread(
                client.call, "get_presence", PresenceQuery(user_id="7"), PresenceResponse, 10
            )
            assert presence.connected and presence.connections[0].instance_id is not None
            b.kill()

    asyncio.run(scenario())

    def offline() -> bool:
        p = client.call("get_presence", PresenceQuery(user_id="7"), PresenceResponse, timeout=10)
        return not p.connected

    wait_until(offline, timeout=10, interval=0.3)
    assert notify(client, "7").user_connected is False


def test_tokens_are_required_and_checked(config: WebSocketRPCConfig, instances: list) -> None:
    inst = Instance(config)
    instances.append(inst)

    async def refused(url: str) -> tuple[int | None, str]:
        async with connect(url) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""
        raise AssertionError("not closed")

    cases = {
        "no token": inst.url(None, token=""),
        "bad signature": inst.url(None, token=make_token("42", "another-secret")),
        "token expired": inst.url(None, token=make_token("42", SECRET, ttl=-60)),
        "malformed token": inst.url(None, token="garbage"),
    }
    for reason, url in cases.items():
        code, text = asyncio.run(refused(url))
        assert code == 4401 and reason in text, (reason, code, text)


def test_oversized_frames_and_floods(config: WebSocketRPCConfig, instances: list) -> None:
    inst = Instance(config)
    instances.append(inst)

    async def scenario() -> None:
        async with connect(inst.url("flood"), max_size=None) as ws:
            await welcome(ws)
            for _ in range(120):
                await ws.send(json.dumps({"type": "ping"}))
            errors = []
            for _ in range(120):
                frame = await recv_json(ws)
                if frame["type"] == "error":
                    errors.append(frame["payload"])
            assert errors and errors[0]["code"] == "rate_limit_exceeded" and errors[0]["retry_after"] > 0
        async with connect(inst.url("big"), max_size=None) as ws:
            await welcome(ws)
            await ws.send("x" * 200_000)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    asyncio.run(scenario())


class WhoAmI(BaseModel):
    user_id: str
    connection_id: str
    data: dict[str, Any]


def test_bridge_round_trip_to_a_django_side_handler(config: WebSocketRPCConfig, instances: list) -> None:
    inst = Instance(config)
    instances.append(inst)
    django_side = RPCServer(config, stream=config.bridge_stream, group=config.bridge_consumer_name)

    @django_side.method("whoami")
    def whoami(params: BridgeParams) -> WhoAmI:
        return WhoAmI(user_id=params.user_id, connection_id=params.connection_id, data=params.data)

    django_side.start()
    try:

        async def scenario() -> None:
            async with connect(inst.url("alice")) as ws:
                hello = await welcome(ws)
                await ws.send(
                    json.dumps(
                        {
                            "type": "request",
                            "id": "r1",
                            "method": "whoami",
                            "params": {"user_id": "mallory", "x": 1},
                        }
                    )
                )
                frame = await recv_json(ws, 10)
                assert frame["type"] == "response" and frame["id"] == "r1"
                result = frame["payload"]["result"]
                assert result["user_id"] == "alice", "the authenticated user, not what the browser claims"
                assert result["connection_id"] == hello["payload"]["connection_id"]
                assert result["data"] == {"user_id": "mallory", "x": 1}
                await ws.send(json.dumps({"type": "request", "id": "r2", "method": "nope", "params": {}}))
                frame = await recv_json(ws, 10)
                assert frame["type"] == "error" and frame["payload"]["code"] == "method_not_found"

        asyncio.run(scenario())
    finally:
        django_side.stop(10)


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_demo_page_in_headless_chromium_shows_a_notification(
    config: WebSocketRPCConfig, instances: list, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    browser = _chromium()
    if browser is None:
        if request.config.getoption("--require-services"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    from websockets.sync.client import connect as sync_connect

    inst = Instance(config)
    instances.append(inst)
    client = WebSocketRPCClient(config)
    debug_port = free_port()
    page_url = f"http://127.0.0.1:{inst.port}/?token={make_token('demo-user', SECRET)}"
    proc = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--remote-debugging-port={debug_port}",
            "--remote-allow-origins=*",
            page_url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def page() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=1) as r:
                    pages = json.loads(r.read())
            except OSError:
                return None
            return next((p for p in pages if p.get("url", "").startswith(page_url[:30])), None)

        target = wait_until(page, timeout=30, interval=0.2)
        with sync_connect(target["webSocketDebuggerUrl"], max_size=None) as cdp:
            counter = iter(range(1, 10_000))

            def command(method: str, **params: Any) -> dict[str, Any]:
                msg_id = next(counter)
                cdp.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    reply = json.loads(cdp.recv(timeout=10))
                    if reply.get("id") == msg_id:
                        return reply.get("result", {})

            def evaluate(expression: str) -> Any:
                return command("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
                    "value"
                )

            wait_until(lambda: evaluate("document.body.getAttribute('data-connected')") == "1", timeout=20)
            result = notify(client, "demo-user")
            assert result.delivered
            text = wait_until(
                lambda: evaluate("document.getElementById('notifications').innerText") or "", timeout=10
            )
            assert "Order: confirmed" in text
            shot = command("Page.captureScreenshot", format="png")["data"]
            out = Path(os.environ.get("RPC_TEST_ARTIFACTS", str(tmp_path))) / "demo-page.png"
            out.write_bytes(__import__("base64").b64decode(shot))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_many_sockets_share_a_small_redis_pool(config: WebSocketRPCConfig, instances: list) -> None:
    small = config.model_copy(update={"redis_max_connections": 5})
    inst = Instance(small)
    instances.append(inst)
    client = WebSocketRPCClient(config)

    async def scenario() -> None:
        sockets = [await connect(inst.url(f"crowd{i}")).__aenter__() for i in range(60)]
        try:
            await asyncio.gather(*(welcome(ws) for ws in sockets))
            result = await asyncio.to_thread(
                client.call, "broadcast", BroadcastRequest(event_type="hi"), BroadcastResponse, 10
            )
            assert result.recipients == 60
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))

    asyncio.run(scenario())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def until_ok(fn: Any, *args: Any, timeout: float = 20.0) -> Any:
    """Call ``fn(*args)`` in a thread until it returns something truthy (errors count as no)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(fn, *args)
            if last:
                return last
        except Exception as exc:  # Redis still coming back, group not yet recreated, ...
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"not recovered within {timeout}s: {last!r}")


async def frame_of(ws: Any, kind: str, frame_id: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of ``kind`` (and ``frame_id``), skipping late ones of earlier attempts."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv_json(ws, max(0.01, deadline - time.monotonic()))
        if frame["type"] == kind and (frame_id is None or frame["id"] == frame_id):
            return frame


def test_server_survives_a_redis_restart(tmp_path: Path) -> None:
    """Redis dies for ~1.5 s and comes back empty (no presence, groups, streams): sockets stay
    up, the heartbeat re-registers presence, Pub/Sub (broadcasts) and the bridge work again,
    and the server neither spins nor floods its log while Redis is down."""
    with PrivateRedis() as redis_server:
        config = ws_config(redis_server.url(db=1))
        log_path = tmp_path / "ws.log"
        log = log_path.open("wb")
        inst = Instance(config, log=log)  # default presence_ttl: a heartbeat every 10 s
        client = WebSocketRPCClient(config)
        django_side = RPCServer(
            config, stream=config.bridge_stream, group=config.bridge_consumer_name, concurrency=2
        )

        @django_side.method("whoami")
        def whoami(params: BridgeParams) -> WhoAmI:
            return WhoAmI(user_id=params.user_id, connection_id=params.connection_id, data=params.data)

        django_side.start()

        def bcast() -> int:
            return client.broadcast(config.broadcast_channel, BroadcastRequest(event_type="e", payload={}))

        def notify_quick(user: str) -> NotificationResponse | None:
            result = client.call(
                "send_notification",
                NotificationRequest(user_id=user, notification_type="t", title="T", message="m"),
                NotificationResponse,
                timeout=2,
            )
            return result if result.delivered else None

        async def bridge(ws: Any, frame_id: str) -> dict[str, Any]:
            await ws.send(json.dumps({"type": "request", "id": frame_id, "method": "whoami", "params": {}}))
            return await frame_of(ws, "response", frame_id, timeout=10)

        async def scenario() -> dict[str, float]:
            timings: dict[str, float] = {}
            async with connect(inst.url("before")) as before:
                await welcome(before)
                sent = await asyncio.to_thread(notify, client, "before")
                assert sent.delivered
                await frame_of(before, "notification", sent.notification_id)
                assert await asyncio.to_thread(bcast) == 1
                await frame_of(before, "broadcast")
                assert (await bridge(before, "b0"))["payload"]["result"]["user_id"] == "before"

                lines_before = len(log_path.read_bytes().splitlines())
                cpu_before = _cpu_seconds(inst.proc.pid)
                redis_server.kill()
                await asyncio.sleep(1.5)
                cpu_down = _cpu_seconds(inst.proc.pid) - cpu_before
                redis_server.start()  # same port, no data
                restarted = time.monotonic()
                assert inst.proc.poll() is None, "the server died with Redis"

                # (a) a socket connected before the outage gets notifications again
                sent = await until_ok(notify_quick, "before")
                await frame_of(before, "notification", sent.notification_id)
                timings["notify"] = time.monotonic() - restarted
                # (b) a new socket works
                async with connect(inst.url("after")) as after:
                    await welcome(after)
                    sent = await until_ok(notify_quick, "after")
                    await frame_of(after, "notification", sent.notification_id)
                    # (c) broadcasts (Pub/Sub) reach both, both ways they are sent
                    assert await until_ok(bcast, timeout=20 - (time.monotonic() - restarted)) == 1
                    await frame_of(before, "broadcast")
                    await frame_of(after, "broadcast")
                    via_rpc = await asyncio.to_thread(
                        client.call, "broadcast", BroadcastRequest(event_type="x"), BroadcastResponse, 10
                    )
                    assert via_rpc.recipients == 2 and via_rpc.users == 2
                    # (c) the bridge towards Django
                    assert (await bridge(after, "b1"))["payload"]["result"]["user_id"] == "after"
                    assert (await bridge(before, "b2"))["payload"]["result"]["user_id"] == "before"
                timings["recovered"] = time.monotonic() - restarted
                assert timings["recovered"] < 20, timings
                timings["cpu_down"] = cpu_down
                timings["log_lines"] = len(log_path.read_bytes().splitlines()) - lines_before
            return timings

        try:
            timings = asyncio.run(scenario())
        finally:
            django_side.stop(10)
            inst.stop()
            log.close()
        logged = log_path.read_text(errors="replace")
        print(timings, "\n", logged[-3000:])
        assert timings["cpu_down"] < 0.5, timings  # no busy loop while Redis is down
        assert timings["log_lines"] <= 20, logged[-3000:]  # a bounded number of warnings


def test_async_store_survives_a_redis_restart_without_a_failed_command() -> None:
    """Pooled connections opened before a Redis restart are stale. redis-py 8 skips its
    check-out test of pooled connections by default (maintenance notifications "auto"), so the
    first command on each failed once: one user's presence update or lookup errored after every
    restart. The store turns that off, so a stale connection is replaced before use; nothing is
    retried (a retried write could run twice). The event loop keeps running through the
    outage, as in the server."""
    from rpc_tasks.websocket.store import AsyncWSStore

    with PrivateRedis() as redis_server:

        async def scenario() -> tuple[list[Any], int]:
            store = AsyncWSStore.from_config(ws_config(redis_server.url(db=1)))
            try:
                # Several pooled connections, all opened before the restart.
                await asyncio.gather(*[store.register(f"c{i}", "u", b"rec") for i in range(4)])
                assert len(await store.user_connections("u")) == 4
                redis_server.kill()
                await asyncio.sleep(0.3)
                redis_server.start()  # same port, no data
                out: list[Any] = []
                for i in range(4):  # transactions (register), reads and PUBLISH
                    await store.register(f"d{i}", "v", b"rec")
                    out.append(await store.user_connections("u"))
                    await store.publish(unique("chan"), b"x")
                return out, len(await store.user_connections("v"))
            finally:
                await store.client.aclose()

        assert asyncio.run(scenario()) == ([[], [], [], []], 4)
