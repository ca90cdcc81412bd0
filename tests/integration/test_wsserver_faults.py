"""The WebSocket server under load and odd input: slow bridge requests, many bridge requests
at once on a small Redis pool, HTTP methods other than GET, tokens in DEBUG logs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from websockets.asyncio.client import connect

from rpc_tasks import RPCServer, WebSocketRPCConfig
from rpc_tasks.websocket.auth import make_token
from rpc_tasks.websocket.models import BridgeParams

from .support import wait_until
from .wsproc import WSServer, recv_json
from .wsproc import ws_config as shared_ws_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret-" + "y" * 16


def ws_config(redis_url: str, **kwargs: Any) -> WebSocketRPCConfig:
    return shared_ws_config(redis_url, SECRET, **kwargs)


class WSProcess(WSServer):
    """``rpc-tasks ws`` in a subprocess, its stderr in a file."""

    def __init__(self, config: WebSocketRPCConfig, log_level: str = "WARNING") -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="rpc-ws-", suffix=".log", delete=False)
        super().__init__(config, log_level=log_level, stderr=self.log)

    def url(self, user: str) -> str:
        return self.socket_url(user, SECRET)

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        super().stop()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture
def launched() -> Iterator[list[WSProcess]]:
    started: list[WSProcess] = []
    yield started
    for proc in started:
        proc.stop()


class Slept(BaseModel):
    user_id: str
    slept_ms: int


def django_side(config: WebSocketRPCConfig, concurrency: int) -> RPCServer:
    server = RPCServer(
        config, stream=config.bridge_stream, group=config.bridge_consumer_name, concurrency=concurrency
    )

    @server.method("sleepy")
    def sleepy(params: BridgeParams) -> Slept:
        ms = int(params.data.get("ms", 0))
        time.sleep(ms / 1000)
        return Slept(user_id=params.user_id, slept_ms=ms)

    return server


def request_frame(frame_id: str, ms: int) -> str:
    return json.dumps({"type": "request", "id": frame_id, "method": "sleepy", "params": {"ms": ms}})


# -- 19 row 6 --------------------------------------------------------------------------------------


def test_bridge_request_slower_than_the_socket_timeout_waits_for_its_reply(
    redis_url: str, launched: list[WSProcess]
) -> None:
    config = ws_config(redis_url)
    inst = WSProcess(config)
    launched.append(inst)
    backend = django_side(config, concurrency=2)
    backend.start()
    try:

        async def scenario() -> dict[str, Any]:
            async with connect(inst.url("slowpoke")) as ws:
                assert (await recv_json(ws, 10))["type"] == "welcome"
                await ws.send(request_frame("r1", 6500))
                return await recv_json(ws, 20)

        frame = asyncio.run(scenario())
        assert frame["type"] == "response", frame
        assert frame["id"] == "r1" and frame["payload"]["result"] == {"user_id": "slowpoke", "slept_ms": 6500}
    finally:
        assert backend.stop(15)


def test_many_bridge_requests_do_not_starve_a_new_users_welcome(
    redis_url: str, launched: list[WSProcess]
) -> None:
    """3 sockets x 8 slow bridge requests on a 12-connection pool: a new user is still
    welcomed (presence registered) while all of them wait, and every request is answered."""
    config = ws_config(redis_url, redis_max_connections=12, redis_pool_timeout=30.0)
    inst = WSProcess(config)
    launched.append(inst)
    backend = django_side(config, concurrency=24)
    backend.start()
    try:

        async def scenario() -> tuple[float, list[dict[str, Any]]]:
            sockets = [await connect(inst.url(f"busy{i}")) for i in range(3)]
            try:
                for ws in sockets:
                    assert (await recv_json(ws, 10))["type"] == "welcome"
                for i, ws in enumerate(sockets):
                    for j in range(8):
                        await ws.send(request_frame(f"r{i}-{j}", 6000))
                await asyncio.sleep(1.0)  # the bridge requests are now waiting for Django
                started = time.monotonic()
                async with connect(inst.url("newcomer")) as fresh:
                    hello = await recv_json(fresh, 30)
                    waited = time.monotonic() - started
                    assert hello["type"] == "welcome"
                answers = [await recv_json(ws, 40) for ws in sockets for _ in range(8)]
                return waited, answers
            finally:
                for ws in sockets:
                    await ws.close()

        waited, answers = asyncio.run(scenario())
        # Bounded, not a benchmark: the welcome must not wait for the 6 s bridge replies.
        assert waited < 4.0, f"welcome took {waited:.1f}s while bridge requests were waiting"
        assert [a["type"] for a in answers] == ["response"] * 24, answers
    finally:
        assert backend.stop(15)


# -- 14.5: HTTP side and logs ----------------------------------------------------------------------


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_http_side_answers_get_and_head_only(redis_url: str, launched: list[WSProcess]) -> None:
    inst = WSProcess(ws_config(redis_url))
    launched.append(inst)
    get = raw_http(inst.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 200"), get[:200]
    head_body = get.split(b"\r\n\r\n", 1)[1]
    assert b"<html" in head_body.lower()
    head = raw_http(inst.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert head.split(b"\r\n\r\n", 1)[1] == b"", "HEAD sends no body"
    healthz = raw_http(inst.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert healthz.startswith(b"HTTP/1.1 200") and healthz.split(b"\r\n\r\n", 1)[1] == b""
    missing = raw_http(inst.port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404"), missing[:200]
    for method in (b"PUT", b"DELETE", b"TRACE", b"POST", b"OPTIONS"):
        answer = raw_http(
            inst.port, method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 405"), (method, answer[:200])
        headers = rest.split(b"\r\n\r\n", 1)[0].lower()
        assert b"allow: get, head" in headers, (method, headers)
        assert b"<html" not in answer.lower()


def test_tokens_are_not_logged_at_debug(redis_url: str, launched: list[WSProcess]) -> None:
    inst = WSProcess(ws_config(redis_url), log_level="DEBUG")
    launched.append(inst)
    token = make_token("tokenuser", SECRET)
    signature = token.split(".")[1]

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{inst.port}/ws?token={token}") as ws:
            assert (await recv_json(ws, 10))["type"] == "welcome"
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(f"ws://127.0.0.1:{inst.port}/ws", additional_headers=headers) as ws:
            assert (await recv_json(ws, 10))["type"] == "welcome"

    asyncio.run(scenario())
    # The handshakes are logged at DEBUG (request lines and headers), with the token redacted.
    logs = wait_until(lambda: inst.logs() if inst.logs().count("GET /ws") >= 2 else "", 10)
    assert "authorization" in logs.lower()
    assert signature not in logs and token not in logs
