"""``await actor.acall()`` / ``acall_many()`` / ``asend()`` against real Redis and workers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from pydantic import BaseModel, ValidationError

from rpc_tasks import (
    RPCConnectionError,
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    WebSocketRPCConfig,
    aclose_loop_connections,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.aio.calls import reader_for
from rpc_tasks.aio.connection import ROOM
from rpc_tasks.middleware import RPCReplies
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.redis.connection import make_redis

from .support import PrivateRedis, redis_broker, reply_keys, running_worker, unique, wait_until


class EchoParams(BaseModel):
    text: str
    sleep: float = 0.0


class EchoResult(BaseModel):
    text: str


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a test coroutine on a fresh loop and close the loop's connections after it."""

    async def main() -> Any:
        try:
            return await coro_fn()
        finally:
            await aclose_loop_connections()

    return asyncio.run(main())


def declare_echo(broker: Any, seen: list[str] | None = None, **options: Any) -> Any:
    @rpc_actor(broker=broker, queue_name=unique("q"), **options)
    def echo(params: EchoParams) -> EchoResult:
        if seen is not None:
            seen.append(params.text)
        if params.sleep:
            time.sleep(params.sleep)
        if params.text == "fail":
            raise RPCRemoteError.from_code("user_not_connected", "nobody home")
        return EchoResult(text=params.text)

    return echo


def test_acall_acall_many_and_asend_match_their_sync_twins(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)
    seen: list[str] = []
    echo = declare_echo(broker, seen, max_retries=0)

    async def scenario() -> None:
        assert await echo.acall(EchoParams(text="hi"), timeout=10) == EchoResult(text="hi")
        assert await echo.acall({"text": "dict"}, timeout=10) == EchoResult(text="dict")
        with pytest.raises(RPCRemoteError) as info:
            await echo.acall(EchoParams(text="fail"), timeout=10)
        assert info.value.error.code is RPCErrorCode.USER_NOT_CONNECTED
        results = await echo.acall_many(
            [EchoParams(text=str(i)) for i in range(20)] + [EchoParams(text="fail")],
            timeout=10,
            return_exceptions=True,
        )
        assert results[:20] == [EchoResult(text=str(i)) for i in range(20)]
        assert isinstance(results[20], RPCRemoteError)
        with pytest.raises(RPCRemoteError):
            await echo.acall_many([EchoParams(text="a"), EchoParams(text="fail")], timeout=10)
        assert await echo.acall_many([], timeout=1) == []
        message = await echo.asend(EchoParams(text="background"))
        assert message.args == ({"text": "background", "sleep": 0.0},)
        await asyncio.to_thread(wait_until, lambda: "background" in seen)

    with running_worker(broker, threads=4):
        run(scenario)
    # Every reply was taken: no reply key is left behind.
    assert reply_keys(redis_url, config.response_key_prefix) == []


def test_bad_params_raise_before_anything_is_enqueued(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    echo = declare_echo(broker)

    async def scenario() -> None:
        with pytest.raises(ValidationError):
            await echo.acall({"text": None}, timeout=1)
        with pytest.raises(ValidationError):
            await echo.acall_many([{"text": "ok"}, {"text": None}], timeout=1)
        with pytest.raises(ValidationError):
            await echo.asend({"text": None})
        with pytest.raises(ValueError):
            await echo.acall({"text": "x"}, timeout=0)

    run(scenario)
    assert broker.client.llen(f"{broker.namespace}:{echo.queue_name}") == 0


def test_timed_out_and_cancelled_calls_leave_no_task_future_or_key_without_ttl(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)
    echo = declare_echo(broker)

    async def scenario() -> None:
        baseline = len(asyncio.all_tasks())
        started = time.perf_counter()
        with pytest.raises(RPCTimeoutError) as info:
            await echo.acall(EchoParams(text="slow", sleep=0.6), timeout=0.2)
        assert 0.19 < time.perf_counter() - started < 0.5
        assert info.value.timeout_seconds == 0.2
        # Cancelled by the caller (task.cancel()) and by a timeout around it (wait_for).
        task = asyncio.ensure_future(echo.acall(EchoParams(text="slow", sleep=0.6), timeout=10))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(echo.acall(EchoParams(text="slow", sleep=0.6), timeout=10), 0.1)
        # The same through the reply reader: the first call takes the fast lane, the others
        # wait on the loop's inbox; all time out, or are cancelled, alike.
        slow = EchoParams(text="slow", sleep=0.6)
        outcomes = await asyncio.gather(
            *(echo.acall(slow, timeout=0.2) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, RPCTimeoutError) for o in outcomes), outcomes
        lone = asyncio.ensure_future(echo.acall(slow, timeout=10))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(echo.acall(slow, timeout=10)) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader = reader_for(find_channel(broker))
        assert reader.waiting == 2
        for task in [lone, *queued]:
            task.cancel()
        outcomes = await asyncio.gather(lone, *queued, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert reader.waiting == 0
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == baseline  # the reader task ended with the last call
        # The late replies arrive after their callers gave up: they are dropped, and the calls
        # made meanwhile still get theirs.
        assert await echo.acall(EchoParams(text="after"), timeout=10) == EchoResult(text="after")
        await asyncio.sleep(2.0)
        assert len(asyncio.all_tasks()) == baseline

    with running_worker(broker, threads=4):
        run(scenario)
    client = redis.Redis.from_url(redis_url)
    keys = reply_keys(redis_url, config.response_key_prefix)
    # Late replies may sit in an abandoned inbox until their TTL ends; never without a TTL.
    assert all(0 < client.ttl(key) <= config.response_key_ttl for key in keys)


def find_channel(broker: Any) -> Any:
    return next(m for m in broker.middleware if isinstance(m, RPCReplies)).channel


def test_many_concurrent_calls_share_a_few_connections(redis_url: str) -> None:
    name = unique("aio-caller")
    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:resp") + ":")
    broker = BlockingRedisBroker(url=redis_url, namespace=unique("ns"))
    broker.add_middleware(
        RPCReplies(config, redis_client=make_redis(redis_url, client_name=name)),
        before=type(broker.middleware[0]),
    )
    setup_broker(broker, config=config, set_global=False)
    echo = declare_echo(broker)
    admin = redis.Redis.from_url(redis_url)
    peak = 0

    async def scenario() -> None:
        nonlocal peak
        calls = [echo.acall(EchoParams(text=str(i)), timeout=60) for i in range(2000)]
        gathered = asyncio.gather(*calls)
        while not gathered.done():
            clients = await asyncio.to_thread(admin.client_list)
            peak = max(peak, sum(1 for c in clients if c.get("name") == name))
            await asyncio.sleep(0.05)
        results = await gathered
        assert [r.text for r in results] == [str(i) for i in range(2000)]

    with running_worker(broker, threads=4):
        run(scenario)
    # The fast lane's, the reader's and the pipe's, whatever the number of calls.
    assert 1 <= peak <= 3


def test_a_burst_beyond_the_pipes_room_waits_its_turn_and_every_call_ends(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    echo = declare_echo(broker)
    count = ROOM * 3

    async def scenario() -> None:
        baseline = len(asyncio.all_tasks())
        bad = {10, ROOM + 10}  # invalid params, raised after their wait for room
        calls = [
            asyncio.ensure_future(
                echo.acall({"text": None} if i in bad else EchoParams(text=str(i)), timeout=60)
            )
            for i in range(count)
        ]
        await asyncio.sleep(0)
        pipe = reader_for(find_channel(broker)).pipe
        assert pipe.crowded  # the later calls wait for room before building their message
        cancelled = calls[ROOM + 20 : ROOM + 40]
        for task in cancelled:
            task.cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            if i in bad:
                assert isinstance(outcome, ValidationError)
            elif calls[i] in cancelled:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == EchoResult(text=str(i))
        assert not pipe.crowded and pipe._admitted == 0
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == baseline

    with running_worker(broker, threads=4):
        run(scenario)


def test_waiting_calls_fail_with_connection_error_when_redis_restarts_then_recover() -> None:
    with PrivateRedis() as server:
        url = server.url()
        broker, _ = redis_broker(url)
        echo = declare_echo(broker)

        async def scenario() -> None:
            assert await echo.acall(EchoParams(text="before"), timeout=10) == EchoResult(text="before")
            waiting = [
                asyncio.ensure_future(echo.acall(EchoParams(text="slow", sleep=1.5), timeout=20))
                for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(restart, server)
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(o, RPCConnectionError) for o in outcomes), outcomes
            deadline = time.monotonic() + 20
            while True:  # recovery: the next calls reconnect (the workers reconnect too)
                try:
                    assert await echo.acall(EchoParams(text="after"), timeout=5) == EchoResult(text="after")
                    break
                except (RPCConnectionError, RPCTimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        with running_worker(broker, threads=4):
            run(scenario)


def restart(server: PrivateRedis) -> None:
    server.kill()
    server.start()


def test_plain_redis_broker_enqueues_from_a_thread(redis_url: str) -> None:
    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:resp") + ":")
    broker = RedisBroker(url=redis_url, namespace=unique("ns"))
    setup_broker(broker, config=config, set_global=False)
    seen: list[str] = []
    echo = declare_echo(broker, seen)
    threads: set[str] = set()
    original = broker.enqueue

    def enqueue(message: Any, *, delay: Any = None) -> Any:
        threads.add(threading.current_thread().name)
        return original(message, delay=delay)

    broker.enqueue = enqueue  # type: ignore[method-assign]

    async def scenario() -> None:
        assert await echo.acall(EchoParams(text="plain"), timeout=10) == EchoResult(text="plain")
        assert await echo.acall_many([EchoParams(text="a"), EchoParams(text="b")], timeout=10) == [
            EchoResult(text="a"),
            EchoResult(text="b"),
        ]
        await echo.asend(EchoParams(text="sent"), delay=10)
        await asyncio.to_thread(wait_until, lambda: "sent" in seen)

    with running_worker(broker, threads=2):
        run(scenario)
    assert threads and threading.main_thread().name not in threads


@pytest.mark.rabbitmq
def test_rabbitmq_broker_acall_and_asend(amqp_url: str, redis_url: str) -> None:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("rmq:resp") + ":")
    broker = RabbitmqBroker(url=amqp_url)
    setup_broker(broker, config=config, set_global=False)
    seen: list[str] = []
    echo = declare_echo(broker, seen)
    queue = echo.queue_name

    async def scenario() -> None:
        assert await echo.acall(EchoParams(text="rmq"), timeout=10) == EchoResult(text="rmq")
        with pytest.raises(RPCRemoteError):
            await echo.acall(EchoParams(text="fail"), timeout=10)
        await echo.asend(EchoParams(text="sent"))
        await asyncio.to_thread(wait_until, lambda: "sent" in seen)
        with pytest.raises(RPCTimeoutError):
            await echo.acall(EchoParams(text="slow", sleep=1.0), timeout=0.2)

    try:
        with running_worker(broker, threads=2):
            run(scenario)
    finally:
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            try:
                broker.channel.queue_delete(name)
            except Exception:
                pass
        broker.close()
