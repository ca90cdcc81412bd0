"""Async callers on a connection that goes silent half-way through a pipelined write (the
first reply arrived, the rest never does: a half-open connection, no FIN, no RST), made by a
proxy (:class:`~.support.HalfOpenProxy`). A call still ends by its deadline, and the loop's
readers and pipes drop such a connection within ``REPLY_TIMEOUT``, so later calls work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from rpc_tasks import (
    RPCConnectionError,
    RPCTimeoutError,
    WebSocketRPCConfig,
    aclose_loop_connections,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.aio import connection
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import HalfOpenProxy, running_worker, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: What "a few ms" may be on a loaded 2-core machine.
LATE = 0.3


class Item(BaseModel):
    n: int


@pytest.fixture
def proxied(redis_url: str) -> Iterator[tuple[HalfOpenProxy, Any]]:
    """A worker on Redis itself, and an actor whose callers go through the proxy."""
    parts = urlsplit(redis_url)
    proxy = HalfOpenProxy(parts.port or 6379)
    db = int(parts.path.strip("/") or 0)
    namespace, queue, name = unique("ns"), unique("q"), unique("echo")
    prefix = unique("test:aresp") + ":"
    brokers = {}
    for side, url in (("worker", redis_url), ("caller", proxy.url(db))):
        brokers[side] = BlockingRedisBroker(url=url, namespace=namespace)
        config = WebSocketRPCConfig(redis_url=url, response_key_prefix=prefix)
        setup_broker(brokers[side], config=config, set_global=False)

    @rpc_actor(broker=brokers["worker"], queue_name=queue, actor_name=name)
    def echo(params: Item) -> Item:
        return params

    @rpc_actor(broker=brokers["caller"], queue_name=queue, actor_name=name)
    def caller(params: Item) -> Item:
        raise AssertionError("runs on the worker's broker")

    try:
        with running_worker(brokers["worker"]):
            yield proxy, caller
    finally:
        proxy.close()


async def _wave(actor: Any, count: int, timeout: float) -> tuple[list[Any], float]:
    started = time.monotonic()
    calls = asyncio.gather(
        *(actor.acall(Item(n=i), timeout=timeout) for i in range(count)), return_exceptions=True
    )
    # A bound for the test itself: a call stuck past its deadline fails the test, not the suite.
    outcomes = await asyncio.wait_for(calls, timeout + 10)
    return outcomes, time.monotonic() - started


def _ended_well(outcomes: list[Any]) -> bool:
    return all(isinstance(o, (Item, RPCTimeoutError, RPCConnectionError)) for o in outcomes)


@pytest.mark.parametrize(
    ("concurrent", "min_replies"), [(1, 2), (20, 3)], ids=["lone-call", "through-the-pipe"]
)
def test_calls_end_by_their_deadline_and_the_next_work_after_a_half_open_write(
    proxied: tuple[HalfOpenProxy, Any], monkeypatch: pytest.MonkeyPatch, concurrent: int, min_replies: int
) -> None:
    proxy, actor = proxied
    monkeypatch.setattr(connection, "REPLY_TIMEOUT", 1.0)  # so the test sees the recovery

    async def scenario() -> tuple[list[Any], float, list[Any]]:
        try:
            warm, _ = await _wave(actor, concurrent, 5)
            assert [o.n for o in warm] == list(range(concurrent))
            # lone call: the BLPOP's reply arrives, the DEL's never does; through the pipe: the
            # first enqueue's reply of a write arrives, the others' never do.
            proxy.arm(min_replies)
            cut, took = await _wave(actor, concurrent, 1.0)
            await asyncio.sleep(1.5)  # REPLY_TIMEOUT: the silent connection is dropped
            after, _ = await _wave(actor, concurrent, 5)
            return cut, took, after
        finally:
            await aclose_loop_connections()

    cut, took, after = asyncio.run(scenario())
    assert proxy.cuts == 1
    assert _ended_well(cut), cut
    assert took < 1.0 + LATE, took
    assert [o.n for o in after] == list(range(concurrent)), after
