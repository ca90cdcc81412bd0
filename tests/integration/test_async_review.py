"""Review of the async callers against a real (private) Redis: a frozen Redis does not hold
the event loop or a call past its deadline, even on the process's first enqueue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCTimeoutError, WebSocketRPCConfig, aclose_loop_connections, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import PrivateRedis, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: What "a few ms" may be on a loaded 2-core machine.
LATE = 0.3


class Item(BaseModel):
    n: int


async def _first_call_while_frozen(work: Any, url: str) -> tuple[BaseException | None, float, float]:
    gaps: list[float] = []

    async def ticker() -> None:  # how long the loop went without running its other tasks
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticks = asyncio.ensure_future(ticker())
    admin = redis.Redis.from_url(url)
    outcome: BaseException | None = None
    try:
        admin.execute_command("CLIENT", "PAUSE", 3000)
        started = time.monotonic()
        try:
            await work.acall(Item(n=1), timeout=0.5)
        except BaseException as exc:
            outcome = exc
        took = time.monotonic() - started
    finally:
        admin.close()
        ticks.cancel()
        await aclose_loop_connections()
    return outcome, took, max(gaps, default=0.0)


def test_the_first_acall_of_a_process_on_a_frozen_redis_blocks_neither_loop_nor_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dramatiq asks Redis for its Lua stack size on the process's first enqueue.
    monkeypatch.setattr(BlockingRedisBroker, "_max_unpack_size_val", None)
    with PrivateRedis() as server:
        url = server.url()
        cfg = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("test:aresp") + ":")
        broker = BlockingRedisBroker(url=url, namespace=unique("ns"))
        setup_broker(broker, config=cfg, set_global=False)

        @rpc_actor(broker=broker, queue_name=unique("q"))
        def work(params: Item) -> Item:
            return params

        outcome, took, longest_gap = asyncio.run(_first_call_while_frozen(work, url))
    assert isinstance(outcome, RPCTimeoutError), repr(outcome)
    assert took < 0.5 + LATE, took
    assert longest_gap < LATE, longest_gap  # the loop kept running its other tasks
