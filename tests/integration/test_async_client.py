"""AsyncWebSocketRPCClient <-> RPCServer over real Redis Streams: same wire, same errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import (
    AsyncWebSocketRPCClient,
    RPCErrorCode,
    RPCRemoteError,
    RPCServer,
    RPCTimeoutError,
    WebSocketRPCConfig,
    aclose_loop_connections,
    get_async_rpc_client,
    protocol,
)

from .support import reply_keys, unique

pytestmark = pytest.mark.redis


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


def make_config(redis_url: str) -> WebSocketRPCConfig:
    return WebSocketRPCConfig(
        redis_url=redis_url,
        request_stream=unique("stream"),
        response_key_prefix=unique("resp") + ":",
        consumer_group=unique("group"),
    )


def test_async_client_call_errors_fire_and_forget_broadcast_and_health(redis_url: str) -> None:
    config = make_config(redis_url)
    server = RPCServer(config, concurrency=2)
    calls: list[Add] = []

    @server.method("add")
    def add(params: Add) -> Sum:
        calls.append(params)
        if params.a < 0:
            raise RPCRemoteError.from_code("rate_limit_exceeded", "slow down", retry_after=2.5)
        if params.a == 999:
            time.sleep(1.0)
        return Sum(total=params.a + params.b)

    client = AsyncWebSocketRPCClient(config)
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.subscribe("aio-news")
    pubsub.get_message(timeout=1)

    async def scenario() -> None:
        assert await client.call("add", Add(a=1, b=2), Sum, timeout=10) == Sum(total=3)
        results = await asyncio.gather(
            *(client.call("add", Add(a=i, b=1), Sum, timeout=10) for i in range(50))
        )
        assert [r.total for r in results] == [i + 1 for i in range(50)]
        with pytest.raises(RPCRemoteError) as info:
            await client.call("add", Add(a=-1, b=0), Sum, timeout=10)
        assert info.value.error.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
        assert info.value.retry_after == 2.5
        with pytest.raises(RPCRemoteError) as missing:
            await client.call("nope", Add(a=1, b=1), Sum, timeout=10)
        assert missing.value.error.code is RPCErrorCode.METHOD_NOT_FOUND
        with pytest.raises(RPCTimeoutError):
            await client.call("add", Add(a=999, b=0), Sum, timeout=0.3)
        with pytest.raises(ValueError):
            await client.call("add", Add(a=1, b=1), Sum, timeout=301)
        entry = await client.fire_and_forget("add", Add(a=7, b=0))
        assert "-" in entry
        assert await client.broadcast("aio-news", Sum(total=5)) == 1
        assert await client.health_check(timeout=5) is True
        await aclose_loop_connections()

    server.start()
    try:
        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while not any(c.a == 7 for c in calls) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(c.a == 7 for c in calls)
    finally:
        server.stop(10)
    message = pubsub.get_message(timeout=2)
    assert message is not None and json.loads(message["data"]) == {"total": 5}
    pubsub.close()
    time.sleep(1.0)  # the timed-out call's late reply: dropped, and its key keeps a TTL
    client_redis = redis.Redis.from_url(redis_url)
    for key in reply_keys(redis_url, config.response_key_prefix):
        assert client_redis.ttl(key) > 0


def test_async_request_is_the_sync_clients_wire_format(redis_url: str) -> None:
    config = make_config(redis_url)
    client = AsyncWebSocketRPCClient(config)

    async def scenario() -> Any:
        try:
            return await client.call("add", Add(a=1, b=2), Sum, timeout=0.2)
        except RPCTimeoutError:
            return None
        finally:
            await aclose_loop_connections()

    asyncio.run(scenario())
    entries = redis.Redis.from_url(redis_url).xrange(config.request_stream)
    assert len(entries) == 1
    fields = entries[0][1]
    assert set(fields) == {b"payload"}
    request = protocol.decode_request(fields[b"payload"])
    assert request.method == "add" and request.params == {"a": 1, "b": 2}
    assert request.timeout == 1 and request.wants_error_details
    assert request.reply_to is not None
    assert protocol.is_reply_key(config.response_key_prefix, request.reply_to)


def test_get_async_rpc_client_is_process_wide(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("WEBSOCKET_RPC_REDIS_URL", redis_url)
    first = get_async_rpc_client(force_new=True)
    assert get_async_rpc_client() is first
    assert get_async_rpc_client(force_new=True) is not first


def test_clients_made_per_request_share_the_loops_connections(redis_url: str) -> None:
    """A client per request (as in an async Django view), dropped after it: the loop's
    connections are shared, not one set per client kept until the loop ends."""
    import gc
    import weakref

    from rpc_tasks.aio import connection

    name = unique("per-request")
    config = make_config(f"{redis_url}?client_name={name}")
    server = RPCServer(config.model_copy(update={"redis_url": redis_url}))

    @server.method("add")
    def add(params: Add) -> Sum:
        return Sum(total=params.a + params.b)

    admin = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[int, int, int]:
        dropped: list[weakref.ref[AsyncWebSocketRPCClient]] = []
        try:
            for i in range(60):
                client = AsyncWebSocketRPCClient(config)
                dropped.append(weakref.ref(client))
                assert (await client.call("add", Add(a=i, b=1), Sum, timeout=5)).total == i + 1
                if i % 3 == 0:  # concurrent calls: the reader and the pipe too
                    two = [client.call("add", Add(a=i, b=k), Sum, timeout=5) for k in (2, 3)]
                    assert [s.total for s in await asyncio.gather(*two)] == [i + 2, i + 3]
                del client
            gc.collect()
            opened = sum(1 for c in admin.client_list() if c.get("name") == name)
            entries = len(connection._per_loop.get(asyncio.get_running_loop(), {}))
            return opened, entries, sum(1 for ref in dropped if ref() is not None)
        finally:
            await aclose_loop_connections()

    server.start()
    try:
        opened, entries, alive = asyncio.run(scenario())
    finally:
        server.stop(10)
        admin.close()
    assert opened <= 3, opened  # reader, pipe, lane of the loop
    assert entries <= 2, entries
    assert alive == 0
