"""Documented set-up paths against the real services: ``setup_broker()`` from
``$DRAMATIQ_BROKER_URL`` (Redis and RabbitMQ), Dramatiq's ``Results`` middleware next to an
``@rpc_actor``, and ``rpc_tasks.testing.in_process_worker()``."""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import dramatiq.broker
import pytest
import redis
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.testing import in_process_worker

from . import support
from .support import running_worker, unique

pytestmark = pytest.mark.redis


class Params(BaseModel):
    word: str


class Shout(BaseModel):
    word: str
    length: int


def _config(redis_url: str) -> WebSocketRPCConfig:
    return WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:resp") + ":")


def test_setup_broker_builds_a_redis_broker_from_dramatiq_broker_url(
    redis_url: str, second_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$DRAMATIQ_BROKER_URL`` wins over ``config.redis_url`` for the broker; replies stay on
    ``config.redis_url`` (here another DB)."""
    monkeypatch.setenv("DRAMATIQ_BROKER_URL", redis_url)
    config = _config(second_redis_url)
    broker = setup_broker(config=config, set_global=False)
    assert isinstance(broker, BlockingRedisBroker)
    broker_db = broker.client.connection_pool.connection_kwargs["db"]
    assert broker_db == int(redis_url.rsplit("/", 1)[1])
    queue = unique("q")

    @rpc_actor(broker=broker, queue_name=queue)
    def shout(params: Params) -> Shout:
        return Shout(word=params.word.upper(), length=len(params.word))

    with running_worker(broker):
        assert shout.call(Params(word="hey"), timeout=10) == Shout(word="HEY", length=3)
    assert redis.Redis.from_url(redis_url).exists(f"dramatiq:{queue}.msgs") == 0  # acked there


@pytest.mark.rabbitmq
def test_setup_broker_builds_a_rabbitmq_broker_from_dramatiq_broker_url(
    redis_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    monkeypatch.setenv("DRAMATIQ_BROKER_URL", amqp_url)
    broker = setup_broker(config=_config(redis_url), set_global=False)
    support._rabbit_brokers.append(broker)  # its queues are deleted below
    try:
        assert isinstance(broker, RabbitmqBroker)

        @rpc_actor(broker=broker, queue_name=unique("rmq"))
        def shout(params: Params) -> Shout:
            return Shout(word=params.word.upper(), length=len(params.word))

        with running_worker(broker):
            assert shout.call(Params(word="amqp"), timeout=10) == Shout(word="AMQP", length=4)
    finally:
        support.close_rabbit_brokers()


def _results_broker(redis_url: str) -> tuple[dramatiq.Broker, RedisBackend, dramatiq.Actor]:
    broker, _ = support.redis_broker(redis_url)
    backend = RedisBackend(client=redis.Redis.from_url(redis_url), namespace=unique("results"))
    broker.add_middleware(Results(backend=backend))

    @rpc_actor(broker=broker, queue_name=unique("q"), store_results=True)
    def shout(params: Params) -> Shout:
        return Shout(word=params.word.upper(), length=len(params.word))

    return broker, backend, shout


def test_dramatiq_results_middleware_gets_the_json_result(redis_url: str) -> None:
    """With Dramatiq's ``Results`` installed, ``message.get_result()`` returns the JSON form of
    an ``@rpc_actor``'s result (README, "Decisions where the seed was vague")."""
    broker, backend, shout = _results_broker(redis_url)
    with running_worker(broker):
        message = shout.send(Params(word="result"))
        assert message.get_result(backend=backend, block=True, timeout=10_000) == {
            "word": "RESULT",
            "length": 6,
        }


def test_call_works_with_dramatiq_results_installed(redis_url: str) -> None:
    broker, backend, shout = _results_broker(redis_url)
    with running_worker(broker):
        assert shout.call(Params(word="typed"), timeout=10) == Shout(word="TYPED", length=5)
        message = shout.send(Params(word="stored"))
        stored = message.get_result(backend=backend, block=True, timeout=10_000)
    assert stored is not None, "a result was stored for the message"


@pytest.fixture
def global_broker(redis_url: str) -> Iterator[dramatiq.Broker]:
    """An rpc-tasks broker set as Dramatiq's global broker for one test (restored after)."""
    previous = dramatiq.broker.global_broker
    broker, _ = support.redis_broker(redis_url)
    dramatiq.set_broker(broker)
    yield broker
    dramatiq.broker.global_broker = previous


def test_in_process_worker_runs_calls_on_the_global_or_a_given_broker(
    redis_url: str, global_broker: dramatiq.Broker
) -> None:
    @rpc_actor(queue_name=unique("q"))  # on the global broker
    def shout(params: Params) -> Shout:
        return Shout(word=params.word.upper(), length=len(params.word))

    with in_process_worker() as worker:
        assert worker.broker is global_broker
        assert shout.call(Params(word="inproc"), timeout=10).word == "INPROC"
    other, _ = support.redis_broker(redis_url)

    @rpc_actor(broker=other, queue_name=unique("q"))
    def whisper(params: Params) -> Shout:
        return Shout(word=params.word.lower(), length=len(params.word))

    with in_process_worker(other, threads=1) as worker:
        assert worker.broker is other and len(worker.workers) == 1
        assert whisper.call(Params(word="QUIET"), timeout=10).word == "quiet"


def test_rpc_encoder_salvages_only_what_is_meant_as_a_message() -> None:
    """The global encoder also decodes Results backends' values: non-message JSON passes
    through; a dict with message fields but the wrong shape becomes the undecodable
    placeholder that keeps its reply address."""
    from rpc_tasks.encoder import UNDECODABLE_ACTOR, RPCJSONEncoder

    encoder = RPCJSONEncoder()
    assert encoder.decode(b'{"message": "hi", "length": 2}') == {"message": "hi", "length": 2}
    assert encoder.decode(b"[1, 2]") == [1, 2]
    salvaged = encoder.decode(b'{"actor_name": "x", "options": {"rpc_reply_to": "r:1"}}')
    assert salvaged["actor_name"] == UNDECODABLE_ACTOR
    assert salvaged["options"]["rpc_reply_to"] == "r:1"
