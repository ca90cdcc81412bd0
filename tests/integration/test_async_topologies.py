"""Async callers where the event loop cannot read the replies itself: a Sentinel-managed reply
client (``redis+sentinel://``) and a Redis Cluster one (``redis+cluster://``, with the messages
on RabbitMQ). ``acall`` / ``acall_many`` / ``asend`` work there as their sync twins do (they run
them in a thread pool, see ``rpc_tasks/aio/threaded.py``), with the same results, errors and
deadlines, and the loop keeps turning while they wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from pydantic import BaseModel

from rpc_tasks import RPCRemoteError, RPCTimeoutError, WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.aio import threaded
from rpc_tasks.exceptions import RPCException
from rpc_tasks.middleware import RPCReplies

from .support import delete_rabbit_queues, running_worker, unique, wait_until
from .topologies import SentinelGroup, private_cluster

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


def _declare(broker: dramatiq.Broker, queue: str, ran: list[int]) -> Any:
    @rpc_actor(broker=broker, queue_name=queue, max_retries=0)
    def add(params: Add) -> Sum:
        if params.b < 0:
            raise ValueError("b must not be negative")
        if params.b == 99:
            time.sleep(1.5)
        ran.append(params.a)
        return Sum(total=params.a + params.b)

    return add


async def _scenario(add: Any) -> dict[str, Any]:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:  # the loop keeps turning while calls wait in threads
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    tick = asyncio.ensure_future(ticker())
    one = await add.acall(Add(a=1, b=2), timeout=20)
    many = await add.acall_many([Add(a=i, b=1) for i in range(20)], timeout=20)
    mixed = await add.acall_many([Add(a=5, b=0), Add(a=6, b=-1)], timeout=20, return_exceptions=True)
    sent = await add.asend(Add(a=1000, b=0))
    started = time.monotonic()
    try:
        await add.acall(Add(a=7, b=99), timeout=0.3)
        timed_out = None
    except RPCTimeoutError as exc:
        timed_out = (exc, time.monotonic() - started)
    stop.set()
    await tick
    return {"one": one, "many": many, "mixed": mixed, "sent": sent, "timed_out": timed_out, "ticks": ticks}


def check_outcome(out: dict[str, Any], ran: list[int]) -> None:
    assert out["one"].total == 3
    assert [r.total for r in out["many"]] == [i + 1 for i in range(20)]
    assert out["mixed"][0].total == 5 and isinstance(out["mixed"][1], RPCRemoteError)
    assert out["sent"].message_id
    assert out["timed_out"] is not None and out["timed_out"][1] < 1.0
    assert out["ticks"] >= 10
    wait_until(lambda: 1000 in ran, 20)


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup(replicas=1) as g:
        yield g


def test_async_callers_on_a_sentinel_url(group: SentinelGroup) -> None:
    url = group.url()
    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("aresp") + ":")
    broker = setup_broker(config=config, broker_url=url, set_global=False)
    replies = next(m for m in broker.middleware if isinstance(m, RPCReplies))
    assert threaded.needs_thread(replies.channel)
    ran: list[int] = []
    add = _declare(broker, unique("asentinel"), ran)
    try:
        with running_worker(broker, threads=4):
            out = asyncio.run(_scenario(add))
            check_outcome(out, ran)
    finally:
        broker.close()


def test_async_callers_with_replies_on_a_cluster(amqp_url: str) -> None:
    pytest.importorskip("pika")
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    with private_cluster(3) as ports:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports[:2]) + "/"
        config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("acl:resp") + ":")
        try:
            broker = RabbitmqBroker(url=amqp_url)
        except Exception as exc:
            pytest.skip(f"RabbitMQ unavailable: {exc}")
        setup_broker(broker, config=config, set_global=False)
        queue = unique("acluster")
        ran: list[int] = []
        add = _declare(broker, queue, ran)
        try:
            with running_worker(broker, threads=4):
                out = asyncio.run(_scenario(add))
                check_outcome(out, ran)
        finally:
            delete_rabbit_queues(broker, queue)
            broker.close()


def test_a_call_that_waited_for_a_thread_past_its_deadline_is_never_enqueued() -> None:
    enqueued: list[float] = []

    def fn(left: float) -> float:
        enqueued.append(left)
        return left

    async def scenario() -> tuple[float, BaseException | None]:
        left = await threaded.run_sync_call("x", 5.0, fn)
        try:
            # Deadline already gone when the thread picks it up.
            await threaded.run_sync_call("x", -1.0, fn)
        except RPCException as exc:
            return left, exc
        return left, None

    left, error = asyncio.run(scenario())
    assert 0 < left <= 5.0
    assert isinstance(error, RPCTimeoutError)
    assert len(enqueued) == 1
