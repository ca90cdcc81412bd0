"""``async def`` under ``@rpc_actor``: run by Dramatiq's AsyncIO middleware in a real worker,
with the same validation, retries, deadlines, rate limits and replies as a plain actor."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware.asyncio import AsyncIO
from pydantic import BaseModel, ValidationError

from rpc_tasks import RPCErrorCode, RPCRemoteError, rpc_actor

from .support import redis_broker, running_worker, unique


class Params(BaseModel):
    n: int


class Result(BaseModel):
    doubled: int
    loop_thread: str


def test_async_actor_runs_on_the_event_loop_thread_with_validation_and_replies(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    assert sum(isinstance(m, AsyncIO) for m in broker.middleware) == 1

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    async def double(params: Params) -> Result:
        await asyncio.sleep(0.01)
        if params.n < 0:
            raise RPCRemoteError.from_code("user_not_connected", "negative")
        return Result(doubled=params.n * 2, loop_thread=threading.current_thread().name)

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    async def bad_result(params: Params) -> Result:
        return {"doubled": "not a number"}  # type: ignore[return-value]

    assert double.is_async and bad_result.is_async
    with running_worker(broker, threads=2):
        result = double.call(Params(n=21), timeout=10)
        assert result.doubled == 42
        loop_thread = get_event_loop_thread()  # the AsyncIO middleware's, started with the worker
        assert loop_thread is not None and result.loop_thread == loop_thread.name
        # many at once share the one loop thread
        many = double.call_many([Params(n=i) for i in range(20)], timeout=10)
        assert [r.doubled for r in many] == [i * 2 for i in range(20)]
        assert len({r.loop_thread for r in many}) == 1
        with pytest.raises(RPCRemoteError) as info:
            double.call(Params(n=-1), timeout=10)
        assert info.value.error.code is RPCErrorCode.USER_NOT_CONNECTED
        with pytest.raises(ValidationError):  # bad params: nothing enqueued
            double.call({"n": "x"}, timeout=10)
        with pytest.raises(RPCRemoteError) as bad:
            bad_result.call(Params(n=1), timeout=10)
        assert bad.value.error.code is RPCErrorCode.INTERNAL_ERROR

        async def from_a_loop() -> Any:
            return await double.acall(Params(n=5), timeout=10)

        assert asyncio.run(from_a_loop()).doubled == 10


def test_async_actor_retries_and_respects_the_callers_deadline(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    attempts: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=5, min_backoff=10, max_backoff=20)
    async def flaky(params: Params) -> Result:
        attempts.append(time.time())
        if len(attempts) < 3:
            raise RPCRemoteError.from_code("service_unavailable", "try again", retry_after=0.05)
        return Result(doubled=params.n * 2, loop_thread="")

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=10, min_backoff=10)
    async def far_retry(params: Params) -> None:
        raise RPCRemoteError.from_code("service_unavailable", "later", retry_after=5.0)

    with running_worker(broker, threads=2):
        assert flaky.call(Params(n=4), timeout=10).doubled == 8
        assert len(attempts) == 3
        assert attempts[2] - attempts[1] >= 0.05
        started = time.monotonic()
        with pytest.raises(RPCRemoteError) as info:
            far_retry.call(Params(n=1), timeout=1.0)
        assert time.monotonic() - started < 0.9
        assert info.value.error.details["next_retry_in"] >= 5.0


def test_async_actor_rate_limit(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    runs: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit="10/s")
    async def limited(params: Params) -> None:
        runs.append(time.monotonic())

    with running_worker(broker, threads=4):
        limited.call_many([Params(n=i) for i in range(6)], timeout=20)
        gaps = [b - a for a, b in zip(sorted(runs), sorted(runs)[1:], strict=False)]
        assert min(gaps) >= 0.09  # 1/rate apart (Redis time; small local clock skew allowed)


def test_async_actor_called_directly_is_awaited(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    async def double(params: Params) -> Result:
        return Result(doubled=params.n * 2, loop_thread="direct")

    assert asyncio.run(double(Params(n=3))) == Result(doubled=6, loop_thread="direct")
    with pytest.raises(ValidationError):
        asyncio.run(double({"n": "x"}))


def test_async_actor_time_limit_interrupts_the_coroutine(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    cancelled: list[bool] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), time_limit=300, max_retries=0)
    async def too_slow(params: Params) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    # The dramatiq CLI emits process_boot, which starts the TimeLimit watchdog thread; an
    # in-process Worker does not.
    broker.emit_after("process_boot")
    with running_worker(broker, threads=2):
        started = time.monotonic()
        with pytest.raises(RPCRemoteError) as info:
            too_slow.call(Params(n=1), timeout=10)
        assert time.monotonic() - started < 5
    assert info.value.error.code is RPCErrorCode.TIMEOUT
    assert cancelled == [True]  # the coroutine itself was cancelled, not left running
