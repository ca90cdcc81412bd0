"""django-cfg's original client (its test double, :mod:`.legacy_client`) against our servers:
``RPCServer`` and ``rpc-tasks ws``."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import (
    NotificationRequest as OurNotificationRequest,
)
from rpc_tasks import (
    NotificationResponse as OurNotificationResponse,
)
from rpc_tasks import (
    RPCErrorCode,
    RPCRemoteError,
    RPCServer,
    WebSocketRPCClient,
    WebSocketRPCConfig,
)

from . import legacy_client as legacy
from .support import unique, wait_until

pytestmark = [pytest.mark.redis]


class Empty(BaseModel):
    pass


class Big(BaseModel):
    size: int


@pytest.fixture
def config(redis_url: str) -> WebSocketRPCConfig:
    return WebSocketRPCConfig(
        redis_url=redis_url,
        request_stream=unique("compat:req"),
        response_key_prefix=unique("compat:resp") + ":",
        max_payload_bytes=64 * 1024,
    )


@pytest.fixture
def server(config: WebSocketRPCConfig) -> Iterator[RPCServer]:
    srv = RPCServer(config, concurrency=2)
    seen: list[OurNotificationRequest] = []

    @srv.method("send_notification")
    def send_notification(params: OurNotificationRequest) -> OurNotificationResponse:
        seen.append(params)
        return OurNotificationResponse(
            user_id=params.user_id, delivered=True, user_connected=True, connection_count=1, connections=1
        )

    @srv.method("big", params_model=Big, result_model=None)
    def big(params: Big) -> dict[str, Any]:
        return {"blob": "x" * params.size}

    @srv.method("boom", params_model=Empty, result_model=None)
    def boom(params: Empty) -> None:
        raise RuntimeError("y" * 2000)

    @srv.method("nothing", params_model=Empty, result_model=None)
    def nothing(params: Empty) -> None:
        return None

    srv.seen = seen  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop(10)


@pytest.fixture
def old(config: WebSocketRPCConfig) -> Iterator[legacy.LegacyClient]:
    client = legacy.LegacyClient(
        config.redis_url,
        request_stream=config.request_stream,
        response_key_prefix=config.response_key_prefix,
        timeout=10,
    )
    yield client
    client.close()


def test_old_client_health_check_is_true_against_rpcserver(
    server: RPCServer, old: legacy.LegacyClient
) -> None:
    assert old.health_check(timeout=10) is True
    # and it is True because echo parsed, not because of a swallowed error
    result = old.call("echo", legacy.EchoParams(message="health_check"), legacy.EchoResult)
    assert (result.echoed, result.length) == ("health_check", len("health_check"))


def test_old_client_system_ping_and_send_notification(server: RPCServer, old: legacy.LegacyClient) -> None:
    old.call("system.ping", Empty(), Empty)
    request = legacy.NotificationRequest(user_id="42", type="order_update", title="T", message="M")
    result = old.call("send_notification", request, legacy.NotificationResponse)
    assert (result.user_id, result.delivered, result.connections) == ("42", True, 1)
    assert server.seen[-1].notification_type == "order_update"  # type: ignore[attr-defined]
    assert old.sent[-1]["params"]["data"] is None  # it sends nulls; we read them


def test_old_client_reads_our_errors_as_remote_errors(server: RPCServer, old: legacy.LegacyClient) -> None:
    with pytest.raises(legacy.LegacyRemoteError) as info:
        old.call("no_such_method", Empty(), Empty)
    assert info.value.error.code is legacy.LegacyErrorCode.METHOD_NOT_FOUND
    with pytest.raises(legacy.LegacyRemoteError) as info:  # 2000-character exception text
        old.call("boom", Empty(), Empty)
    assert info.value.error.code is legacy.LegacyErrorCode.INTERNAL_ERROR
    assert len(info.value.error.message) <= 500
    with pytest.raises(legacy.LegacyRemoteError) as info:  # our payload_too_large, mapped
        old.call("big", Big(size=100_000), Empty)
    assert info.value.error.code is legacy.LegacyErrorCode.INVALID_PARAMS
    with pytest.raises(legacy.LegacyRemoteError) as info:  # many field errors
        old.call("send_notification", Big(size=1), legacy.NotificationResponse)
    assert info.value.error.code is legacy.LegacyErrorCode.VALIDATION_ERROR


def test_old_client_gets_an_empty_object_for_a_none_result(
    server: RPCServer, old: legacy.LegacyClient
) -> None:
    assert old.call("nothing", Empty(), Empty) == Empty()


def test_announcing_callers_keep_full_detail(server: RPCServer, config: WebSocketRPCConfig) -> None:
    client = WebSocketRPCClient(config)
    with pytest.raises(RPCRemoteError) as info:
        client.call("big", Big(size=100_000), Empty, timeout=10)
    assert info.value.error.code is RPCErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(RPCRemoteError) as info:
        client.call("boom", Empty(), Empty, timeout=10)
    assert len(info.value.error.message) > 500


def test_old_client_fire_and_forget_runs_the_handler(server: RPCServer, old: legacy.LegacyClient) -> None:
    request = legacy.NotificationRequest(user_id="7", type="ping_me", title="T", message="M")
    old.fire_and_forget("send_notification", request)
    wait_until(lambda: any(s.user_id == "7" for s in server.seen), timeout=10)  # type: ignore[attr-defined]
    seen = [s for s in server.seen if s.user_id == "7"]  # type: ignore[attr-defined]
    assert len(seen) == 1 and seen[0].notification_type == "ping_me"


def test_unreadable_request_gets_a_reply_with_a_uuid_correlation_id(
    server: RPCServer, config: WebSocketRPCConfig
) -> None:
    client = redis.Redis.from_url(config.redis_url)
    key = config.response_key_prefix + uuid.uuid4().hex
    body = {"correlation_id": 12, "method": "echo", "reply_to": key, "timeout": 5, "params": {}}
    client.xadd(config.request_stream, {"payload": json.dumps(body)})
    got = client.blpop([key], 10)
    assert got is not None
    with pytest.raises(legacy.LegacyRemoteError) as info:
        legacy.parse_reply(got[1], Empty)
    assert info.value.error.code is legacy.LegacyErrorCode.INVALID_PARAMS
    assert json.loads(got[1])["correlation_id"] == str(uuid.UUID(int=0))
    client.close()


# -- against `rpc-tasks ws` --------------------------------------------------------------------


def test_old_client_against_the_websocket_server(redis_url: str) -> None:
    from websockets.asyncio.client import connect

    from .test_wsserver import Instance, recv_json, welcome, ws_config

    config = ws_config(redis_url)
    inst = Instance(config)
    old = legacy.LegacyClient(
        config.redis_url,
        request_stream=config.request_stream,
        response_key_prefix=config.response_key_prefix,
        timeout=10,
    )
    try:
        assert old.health_check(timeout=10) is True
        offline = old.call(
            "send_notification",
            legacy.NotificationRequest(user_id="nobody", type="order_update", title="T", message="M"),
            legacy.NotificationResponse,
        )
        assert (offline.delivered, offline.connections) == (False, 0)

        async def scenario() -> None:
            async with connect(inst.url("42")) as ws:
                await welcome(ws)
                request = legacy.NotificationRequest(
                    user_id="42", type="order_update", title="Hi", message="Body", data={"order_id": 7}
                )
                result = await asyncio.to_thread(
                    old.call, "send_notification", request, legacy.NotificationResponse
                )
                assert (result.user_id, result.delivered, result.connections) == ("42", True, 1)
                frame = await recv_json(ws)
                assert frame["type"] == "notification"
                assert frame["payload"]["notification_type"] == "order_update"
                bcast = legacy.BroadcastRequest(target="all", title="T", message="Everyone")
                answer = await asyncio.to_thread(old.call, "broadcast", bcast, legacy.BroadcastResponse)
                assert (answer.target, answer.recipients) == ("all", 1)
                frame = await recv_json(ws)
                assert frame["type"] == "broadcast" and frame["payload"]["message"] == "Everyone"
                # its Pub/Sub broadcast() reaches our sockets too
                assert await asyncio.to_thread(old.broadcast, config.broadcast_channel, bcast) == 1
                frame = await recv_json(ws)
                assert frame["type"] == "broadcast" and frame["payload"]["title"] == "T"

        asyncio.run(scenario())
    finally:
        old.close()
        inst.stop()
