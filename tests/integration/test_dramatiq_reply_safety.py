"""Replies and logs on the Dramatiq path: a key of another type under the reply prefix never
gets a TTL (the ``EXPIRE`` runs only when the ``LPUSH`` succeeded) and the log says what
happened; params never reach a log line unless ``log_rpc_params`` is on."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, protocol, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.redis.replies import ReplyChannel

from .support import delete_rabbit_queues, redis_broker, running_worker, unique, wait_until

pytestmark = pytest.mark.redis


class SecretParams(BaseModel):
    secret: str


class Done(BaseModel):
    ok: bool


def _send_with_reply_to(actor: object, key: str, params: BaseModel) -> None:
    message = actor.message_with_options(args=(params,))  # type: ignore[attr-defined]
    message.options[protocol.OPTION_REPLY_TO] = key
    message.options[protocol.OPTION_DEADLINE] = time.time() + 30
    actor.broker.enqueue(message)  # type: ignore[attr-defined]


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_a_non_list_key_under_the_reply_prefix_gets_no_ttl_and_the_log_says_so(
    redis_url: str, outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Success replies go out with the ack (the ack script), error replies through
    ``ReplyChannel.push``: neither may put a TTL on a key it could not push to."""
    broker, config = redis_broker(redis_url)
    processed: list[str] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    def act(params: SecretParams) -> Done:
        processed.append(params.secret)
        if outcome == "failure":
            raise RuntimeError("boom")
        return Done(ok=True)

    client = redis.Redis.from_url(redis_url)
    key = protocol.reply_key(config.response_key_prefix, uuid.uuid4().hex)
    client.set(key, "not a list")
    caplog.set_level(logging.INFO)
    with running_worker(broker):
        _send_with_reply_to(act, key, SecretParams(secret="s"))
        wait_until(lambda: processed, timeout=10)
        wait_until(lambda: client.hlen(f"{broker.namespace}:{act.queue_name}.msgs") == 0, timeout=10)
        wait_until(lambda: "could not be pushed" in caplog.text or "nothing was written" in caplog.text, 10)
    assert client.get(key) == b"not a list"
    assert client.ttl(key) == -1, "EXPIRE ran although the LPUSH failed"
    assert "WRONGTYPE" in caplog.text
    client.close()


def test_reply_channel_push_sets_no_ttl_when_the_push_fails(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    channel = ReplyChannel(client, prefix="t:", ttl=30)
    client.set("t:x", "v")
    with pytest.raises(Exception, match="WRONGTYPE"):
        channel.push("t:x", b"reply")
    assert client.ttl("t:x") == -1
    channel.push("t:y", b"reply")
    assert client.lrange("t:y", 0, -1) == [b"reply"] and 0 < client.ttl("t:y") <= 30
    client.close()


@pytest.mark.parametrize("log_params", [False, True])
def test_params_never_reach_the_worker_log_unless_asked(
    redis_url: str, log_params: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A message with a secret in its params fails on a real worker: Dramatiq's "Failed to
    process message ..." line names the actor and message, not the params."""
    config = WebSocketRPCConfig(
        redis_url=redis_url, response_key_prefix=unique("test:resp") + ":", log_rpc_params=log_params
    )
    broker = BlockingRedisBroker(url=redis_url, namespace=unique("ns"))
    setup_broker(broker, config=config, set_global=False)
    secret = "hunter2-" + uuid.uuid4().hex
    failed: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=1, min_backoff=10, max_backoff=10)
    def leaky(params: SecretParams) -> None:
        failed.append(1)
        raise RuntimeError("boom")

    caplog.set_level(logging.DEBUG)
    with running_worker(broker):
        leaky.send(SecretParams(secret=secret))
        wait_until(lambda: len(failed) == 2, timeout=10)
        wait_until(lambda: caplog.text.count("Failed to process message") >= 2, timeout=10)
    assert "leaky" in caplog.text
    assert (secret in caplog.text) is log_params


@pytest.mark.rabbitmq
def test_params_never_reach_the_worker_log_on_rabbitmq(
    amqp_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Same promise on Dramatiq's RabbitmqBroker, whose consumer builds its own proxies."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("rmq:resp") + ":")
    broker = RabbitmqBroker(url=amqp_url)
    setup_broker(broker, config=config, set_global=False)
    queue = unique("rmq")
    secret = "hunter2-" + uuid.uuid4().hex
    failed: list[int] = []

    @rpc_actor(broker=broker, queue_name=queue, max_retries=0)
    def leaky(params: SecretParams) -> None:
        failed.append(1)
        raise RuntimeError("boom")

    caplog.set_level(logging.DEBUG)
    try:
        with running_worker(broker):
            leaky.send(SecretParams(secret=secret))
            wait_until(lambda: failed, timeout=20)
            wait_until(lambda: "Failed to process message" in caplog.text, timeout=10)
    finally:
        delete_rabbit_queues(broker, queue)
        broker.close()
    failure_lines = [line for line in caplog.text.splitlines() if "Failed to process message" in line]
    assert failure_lines and all("leaky" in line for line in failure_lines)
    assert secret not in "\n".join(failure_lines)
