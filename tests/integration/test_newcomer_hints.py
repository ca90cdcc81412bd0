"""A ``.call()`` nobody answers says where its message is, so the fix is obvious."""

from __future__ import annotations

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCTimeoutError, rpc_actor, setup_broker

from .support import redis_broker, running_worker, unique

pytestmark = [pytest.mark.redis]


class Ping(BaseModel):
    n: int = 0


class Pong(BaseModel):
    n: int


def test_call_with_no_worker_says_the_message_waits_and_no_worker_is_alive(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    queue = unique("nobody")

    @rpc_actor(broker=broker, queue_name=queue)
    def ping(params: Ping) -> Pong:
        return Pong(n=params.n)

    with pytest.raises(RPCTimeoutError) as info:
        ping.call(Ping(), timeout=0.3)
    text = str(info.value)
    assert f"still waiting on queue {queue!r}" in text and "no worker of this broker is alive" in text
    assert info.value.timeout_seconds == 0.3


def test_call_to_a_queue_no_live_worker_consumes_says_so(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("served"))
    def served(params: Ping) -> Pong:
        return Pong(n=params.n)

    with running_worker(broker):  # alive, but its broker never heard of the other queue
        caller_broker = type(broker)(client=redis.Redis.from_url(redis_url), namespace=broker.namespace)
        setup_broker(caller_broker, config=config, set_global=False)
        queue = unique("unserved")

        @rpc_actor(broker=caller_broker, queue_name=queue)
        def unserved(params: Ping) -> Pong:
            return Pong(n=params.n)

        assert served.call(Ping(n=1), timeout=10).n == 1
        with pytest.raises(RPCTimeoutError) as info:
            unserved.call(Ping(), timeout=0.3)
    assert "are alive but no worker took it" in str(info.value)
    assert f"consume queue {queue!r}" in str(info.value)
