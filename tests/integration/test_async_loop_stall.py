"""A blocked event loop (a coroutine calling ``time.sleep``) is not a lost connection: replies
that arrive while the loop is blocked are delivered once it runs again, even when the reply
reader's read timer is due by then (it fires in the same loop step as the data)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, aclose_loop_connections, rpc_actor, setup_broker
from rpc_tasks.aio import replies
from rpc_tasks.aio.calls import reader_for
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import running_worker, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class Item(BaseModel):
    sleep_ms: int


class Out(BaseModel):
    sleep_ms: int


def test_replies_that_arrive_while_the_loop_is_blocked_are_delivered(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader's BLPOP blocks 1 s and its read may take 1.5 s (5 s and 7 s by default): the
    # worker replies at ~1.0 s, during a 2 s block of the loop from 0.9 s, so when the loop runs
    # again both the reply and the read timer are there.
    monkeypatch.setattr(replies, "BLOCK_SECONDS", 1)
    monkeypatch.setattr(replies, "_SLACK", 0.5)
    cfg = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:aresp") + ":")
    broker = BlockingRedisBroker(url=redis_url, namespace=unique("ns"))
    setup_broker(broker, config=cfg, set_global=False)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def work(params: Item) -> Out:
        time.sleep(params.sleep_ms / 1000)
        return Out(sleep_ms=params.sleep_ms)

    async def main() -> tuple[list[Any], dict[str, int], list[Any]]:
        try:
            assert (await work.acall(Item(sleep_ms=0), timeout=5)).sleep_ms == 0
            loop = asyncio.get_running_loop()
            loop.call_later(0.9, time.sleep, 2.0)  # the whole loop is blocked for 2 s
            outcomes = await asyncio.gather(
                *(work.acall(Item(sleep_ms=1000), timeout=20) for _ in range(5)), return_exceptions=True
            )
            counters = dict(reader_for(work._replies().channel).counters)
            after = await asyncio.gather(*(work.acall(Item(sleep_ms=0), timeout=5) for _ in range(5)))
            return outcomes, counters, after
        finally:
            await aclose_loop_connections()

    with running_worker(broker, threads=8):
        outcomes, counters, after = asyncio.run(main())
    assert [getattr(o, "sleep_ms", o) for o in outcomes] == [1000] * 5
    assert counters.get("lost_connection", 0) == 0
    assert [o.sleep_ms for o in after] == [0] * 5
