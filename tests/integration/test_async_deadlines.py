"""Async callers return by their deadline (plus a few ms) when Redis freezes (``CLIENT
PAUSE``) under them, like the sync ``.call()`` (``test_dramatiq_caller_deadlines.py``): a lone
call on the fast lane, and calls that go through the loop's pipe and reply reader."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCTimeoutError, WebSocketRPCConfig, aclose_loop_connections, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import PrivateRedis, running_worker, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: What "a few ms" may be on a loaded 2-core machine.
LATE = 0.3


class Item(BaseModel):
    n: int


class Out(BaseModel):
    n: int


def _setup(url: str) -> tuple[BlockingRedisBroker, Any]:
    cfg = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("test:aresp") + ":")
    broker = BlockingRedisBroker(url=url, namespace=unique("ns"))
    setup_broker(broker, config=cfg, set_global=False)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def work(params: Item) -> Out:
        return Out(n=params.n)

    return broker, work


async def _frozen(work: Any, url: str, concurrent: int) -> tuple[list[BaseException | Any], float]:
    assert (await work.acall(Item(n=0), timeout=5)).n == 0  # connections open and warm
    assert [r.n for r in await work.acall_many([Item(n=i) for i in range(3)], timeout=5)] == [0, 1, 2]
    admin = redis.Redis.from_url(url)
    try:
        admin.execute_command("CLIENT", "PAUSE", 3000)
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(work.acall(Item(n=i), timeout=1.0) for i in range(concurrent)), return_exceptions=True
        )
        took = time.monotonic() - started
    finally:
        admin.close()
        await aclose_loop_connections()
    return outcomes, took


@pytest.mark.parametrize("concurrent", [1, 20], ids=["lone-call", "through-the-pipe"])
def test_acall_returns_by_its_deadline_when_redis_is_frozen(concurrent: int) -> None:
    with PrivateRedis() as server:
        broker, work = _setup(server.url())
        with running_worker(broker):
            outcomes, took = asyncio.run(_frozen(work, server.url(), concurrent))
    assert all(isinstance(o, RPCTimeoutError) for o in outcomes), outcomes
    assert took < 1.0 + LATE, took


async def _frozen_many(work: Any, url: str) -> tuple[list[Any], float]:
    assert [r.n for r in await work.acall_many([Item(n=i) for i in range(3)], timeout=5)] == [0, 1, 2]
    admin = redis.Redis.from_url(url)
    try:
        admin.execute_command("CLIENT", "PAUSE", 3000)
        started = time.monotonic()
        outcomes = await work.acall_many([Item(n=i) for i in range(10)], timeout=1.0, return_exceptions=True)
        took = time.monotonic() - started
    finally:
        admin.close()
        await aclose_loop_connections()
    return outcomes, took


def test_acall_many_returns_by_its_deadline_when_redis_is_frozen() -> None:
    with PrivateRedis() as server:
        broker, work = _setup(server.url())
        with running_worker(broker):
            outcomes, took = asyncio.run(_frozen_many(work, server.url()))
    assert len(outcomes) == 10 and all(isinstance(o, RPCTimeoutError) for o in outcomes), outcomes
    assert took < 1.0 + LATE, took
