"""rpc_tasks.testing covers async callers and async actors: InlineRunner runs acall /
acall_many / asend (and ``async def`` actors) inline; FakeRPCClient has a coroutine twin."""

from __future__ import annotations

import asyncio

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from pydantic import BaseModel

from rpc_tasks import (
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    get_async_rpc_client,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.testing import FakeRPCClient, InlineRunner


class Params(BaseModel):
    n: int


class Result(BaseModel):
    doubled: int


@pytest.fixture
def broker() -> dramatiq.Broker:
    return setup_broker(StubBroker(), set_global=False)


def test_inline_runner_runs_async_callers_and_async_actors(broker: dramatiq.Broker) -> None:
    attempts = 0

    @rpc_actor(broker=broker, max_retries=3, min_backoff=100)
    async def flaky(params: Params) -> Result:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts < 2:
            raise RPCRemoteError.from_code("service_unavailable", "again", retry_after=1.0)
        return Result(doubled=params.n * 2)

    @rpc_actor(broker=broker, max_retries=0)
    def plain(params: Params) -> Result:
        if params.n < 0:
            raise RPCRemoteError.from_code("user_not_connected", "no")
        return Result(doubled=params.n * 2)

    async def scenario(runner: InlineRunner) -> None:
        assert await flaky.acall(Params(n=2), timeout=5) == Result(doubled=4)
        assert [a.at_ms for a in runner.attempts[-2:]][1] >= 1000  # retry_after honoured (virtual)
        outcomes = await plain.acall_many([Params(n=1), Params(n=-1)], return_exceptions=True)
        assert outcomes[0] == Result(doubled=2)
        assert isinstance(outcomes[1], RPCRemoteError)
        assert outcomes[1].error.code is RPCErrorCode.USER_NOT_CONNECTED
        with pytest.raises(RPCRemoteError):
            await plain.acall_many([Params(n=-1)])
        message = await plain.asend(Params(n=5))
        assert message.args == ({"n": 5},)
        # a sync call of an async actor works too
        assert flaky.call(Params(n=3)) == Result(doubled=6)

    with InlineRunner() as runner:
        asyncio.run(scenario(runner))
    # Only the plain sync call path ran outside the loop: no Redis, no worker was needed.
    assert [a.actor for a in runner.attempts].count("plain") == 4
    assert [a.actor for a in runner.attempts].count("flaky") == 3


def test_fake_client_async_twin_shares_the_script() -> None:
    fake = FakeRPCClient().returns("double", lambda p: Result(doubled=p.n * 2))
    fake.fails("flaky", "rate_limit_exceeded", retry_after=2.0).times_out("slow")

    async def scenario() -> None:
        client = get_async_rpc_client()
        assert await client.call("double", Params(n=4), Result) == Result(doubled=8)
        with pytest.raises(RPCRemoteError) as info:
            await client.call("flaky", Params(n=1), Result)
        assert info.value.retry_after == 2.0
        with pytest.raises(RPCTimeoutError):
            await client.call("slow", Params(n=1), Result, timeout=0.5)
        assert await client.fire_and_forget("double", Params(n=1))
        assert await client.broadcast("news", Result(doubled=1)) == 1
        fake.healthy = False
        assert await client.health_check() is False

    with fake.install():
        asyncio.run(scenario())
    assert fake.calls_to("double") == [{"n": 4}, {"n": 1}]
    assert fake.broadcasts == [("news", {"doubled": 1})]
