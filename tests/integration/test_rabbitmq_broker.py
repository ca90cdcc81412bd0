"""@rpc_actor on Dramatiq's RabbitmqBroker; replies still travel over Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import dramatiq
import pytest
from pydantic import BaseModel, ValidationError

from rpc_tasks import (
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    UserNotConnectedError,
    WebSocketRPCConfig,
    rpc_actor,
    setup_broker,
)

from .support import delete_rabbit_queues, running_worker, unique, wait_until

pytestmark = pytest.mark.rabbitmq


class Params(BaseModel):
    user_id: str


class Result(BaseModel):
    greeting: str


@pytest.fixture
def rmq_broker(amqp_url: str, redis_url: str) -> Iterator[tuple[dramatiq.Broker, str]]:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("rmq:resp") + ":")
    broker = RabbitmqBroker(url=amqp_url)
    setup_broker(broker, config=config, set_global=False)
    queue = unique("rmq")
    yield broker, queue
    delete_rabbit_queues(broker, queue)
    broker.close()


def test_rabbitmq_send_call_and_remote_error(rmq_broker: tuple[dramatiq.Broker, str]) -> None:
    broker, queue = rmq_broker
    seen: list[str] = []

    @rpc_actor(broker=broker, queue_name=queue, max_retries=1, min_backoff=10, max_backoff=20)
    def greet(params: Params) -> Result:
        seen.append(params.user_id)
        if params.user_id == "offline":
            raise RPCRemoteError(UserNotConnectedError(message="offline", user_id="offline"))
        if params.user_id == "slow":
            time.sleep(1)
        return Result(greeting=f"hello {params.user_id}")

    with pytest.raises(ValidationError):
        greet.send({"user_id": None})

    with running_worker(broker):
        greet.send(Params(user_id="background"))
        wait_until(lambda: "background" in seen)
        assert greet.call(Params(user_id="42"), timeout=5) == Result(greeting="hello 42")
        with pytest.raises(RPCRemoteError) as info:
            greet.call(Params(user_id="offline"), timeout=5)
        assert info.value.error.code is RPCErrorCode.USER_NOT_CONNECTED
        assert seen.count("offline") == 1
        started = time.perf_counter()
        with pytest.raises(RPCTimeoutError):
            greet.call(Params(user_id="slow"), timeout=0.2)
        assert time.perf_counter() - started < 0.3
