"""The caller's side under faults: ``.call()`` returns by its deadline (plus a few ms) whatever
the reply pool, redis-py's health check or a frozen Redis do, and enqueues nothing once
expired; ``call_many`` survives its reply connection being killed mid-drain."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCTimeoutError, WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import PrivateRedis, running_worker, unique

pytestmark = pytest.mark.redis

#: What "a few ms" may be on a loaded 2-core machine (before the fixes: 10 s and 3 s late).
LATE = 0.3


class Item(BaseModel):
    n: int
    sleep: float = 0.0


class Out(BaseModel):
    n: int


def _setup(url: str, **config: Any) -> tuple[BlockingRedisBroker, Any]:
    cfg = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("test:resp") + ":", **config)
    broker = BlockingRedisBroker(url=url, namespace=unique("ns"))
    setup_broker(broker, config=cfg, set_global=False)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def work(params: Item) -> Out:
        time.sleep(params.sleep)
        return Out(n=params.n)

    return broker, work


def test_call_returns_by_its_deadline_and_enqueues_nothing_when_the_pool_is_exhausted(redis_url: str) -> None:
    broker, work = _setup(redis_url, redis_max_connections=1, redis_pool_timeout=10)
    channel = broker.middleware[0].channel
    held = channel.client.connection_pool.get_connection()  # the only connection
    try:
        started = time.monotonic()
        with pytest.raises(RPCTimeoutError):
            work.call(Item(n=1), timeout=0.5)
        took = time.monotonic() - started
    finally:
        channel.client.connection_pool.release(held)
    assert took < 0.5 + LATE, took
    assert broker.do_qsize(work.queue_name) == 0, "an already-expired message was enqueued"


def test_call_returns_by_its_deadline_when_redis_is_frozen() -> None:
    """An idle pooled reply connection due for redis-py's health check and a Redis paused
    with CLIENT PAUSE: the health-check PING would wait for the 5 s socket timeout."""
    with PrivateRedis() as server:
        broker, work = _setup(server.url())
        channel = broker.middleware[0].channel
        with running_worker(broker):
            assert work.call(Item(n=1), timeout=5).n == 1
            for conn in list(channel.client.connection_pool.pool.queue):
                if conn is not None:
                    conn.next_health_check = 0  # idle long enough: checked on next use
            admin = redis.Redis.from_url(server.url())
            admin.execute_command("CLIENT", "PAUSE", 3000)
            started = time.monotonic()
            with pytest.raises(RPCTimeoutError):
                work.call(Item(n=2), timeout=1.0)
            took = time.monotonic() - started
            admin.close()
        assert took < 1.0 + LATE, took


def test_call_many_keeps_drained_replies_when_its_connection_is_killed(redis_url: str) -> None:
    broker, work = _setup(redis_url)
    channel = broker.middleware[0].channel
    channel.client.connection_pool.connection_kwargs["client_name"] = "call-many-caller"
    admin = redis.Redis.from_url(redis_url)
    killed: list[int] = []

    def kill_mid_drain() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not killed:
            for client in admin.client_list():
                if client.get("name") == "call-many-caller" and client.get("cmd") == "blpop":
                    admin.client_kill_filter(_id=client["id"])
                    killed.append(int(client["id"]))
                    return
            time.sleep(0.02)

    with running_worker(broker, threads=2):
        for return_exceptions in (True, False):
            killed.clear()
            killer = threading.Thread(target=kill_mid_drain, daemon=True)
            killer.start()
            items = [Item(n=i, sleep=0.01) for i in range(40)]
            results = work.call_many(items, timeout=15, return_exceptions=return_exceptions)
            killer.join(10)
            assert killed, "the caller's connection was never killed"
            assert [r.n for r in results] == list(range(40))
    admin.close()
