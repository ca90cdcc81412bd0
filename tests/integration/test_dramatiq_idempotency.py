"""Idempotent actors (``@rpc_actor(idempotent=True)`` or an ``idempotency_key`` option) run
once per key: a redelivered message returns the stored result, a duplicate that arrives while
the first run is going waits for it."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import protocol, rpc_actor
from rpc_tasks.middleware import RPCIdempotency, check_broker

from .support import redis_broker, running_worker, unique, wait_until

pytestmark = pytest.mark.redis


class Work(BaseModel):
    item: str
    seconds: float = 0.0


class Receipt(BaseModel):
    run: int


def _actor(broker: Any, runs: list[str], **options: Any) -> Any:
    lock = threading.Lock()

    @rpc_actor(broker=broker, queue_name=unique("q"), **options)
    def charge(params: Work) -> Receipt:
        with lock:
            runs.append(params.item)
            number = len(runs)
        time.sleep(params.seconds)
        return Receipt(run=number)

    return charge


def _deliver(actor: Any, message: Any, reply_key: str) -> None:
    """Enqueue ``message`` (same message id every time, as a redelivery has) with a reply key."""
    copy = message.copy(
        options={protocol.OPTION_REPLY_TO: reply_key, protocol.OPTION_DEADLINE: time.time() + 30}
    )
    actor.broker.enqueue(copy)


def _reply(channel: Any, key: str) -> Receipt:
    raw = channel.wait(key, 15)
    assert raw is not None
    response = protocol.decode_response(raw)
    assert response.success, response.error
    return Receipt.model_validate(response.result)


def test_setup_broker_installs_idempotency_in_its_place(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    kinds = [type(m).__name__ for m in broker.middleware]
    assert kinds.index("RPCIdempotency") == kinds.index("RPCRateLimits") + 1
    assert check_broker(broker) == []


def test_a_redelivered_message_returns_the_stored_result_without_running(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)
    runs: list[str] = []
    charge = _actor(broker, runs, idempotent=True)
    channel = broker.middleware[0].channel
    message = charge.message_with_options(args=(Work(item="a"),))
    with running_worker(broker):
        first, second = (protocol.reply_key(config.response_key_prefix, uuid.uuid4().hex) for _ in range(2))
        _deliver(charge, message, first)
        assert _reply(channel, first).run == 1
        _deliver(charge, message, second)  # redelivered after it completed
        assert _reply(channel, second).run == 1, "the stored result, not a second run"
        assert charge.call(Work(item="b"), timeout=10).run == 2  # another message runs
    assert runs == ["a", "b"]


def test_a_duplicate_waits_for_the_run_in_progress_instead_of_running_in_parallel(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)
    runs: list[str] = []
    charge = _actor(broker, runs, idempotent=True)
    channel = broker.middleware[0].channel
    message = charge.message_with_options(args=(Work(item="slow", seconds=1.0),))
    keys = [protocol.reply_key(config.response_key_prefix, uuid.uuid4().hex) for _ in range(2)]
    with running_worker(broker, threads=4):
        _deliver(charge, message, keys[0])
        wait_until(lambda: runs, timeout=10)
        _deliver(charge, message, keys[1])  # while the first run is going
        receipts = [_reply(channel, k) for k in keys]
    assert runs == ["slow"]
    assert [r.run for r in receipts] == [1, 1]


def test_an_idempotency_key_dedups_messages_with_different_ids(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    runs: list[str] = []
    charge = _actor(broker, runs)
    with running_worker(broker):
        assert charge.call(Work(item="k1"), timeout=10, idempotency_key="order-42").run == 1
        assert charge.call(Work(item="k2"), timeout=10, idempotency_key="order-42").run == 1
        assert charge.call(Work(item="k3"), timeout=10).run == 2  # no key: runs
    assert runs == ["k1", "k3"]


def test_a_failed_run_releases_its_lock_and_stores_nothing(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    attempts: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), idempotent=True, min_backoff=10, max_backoff=10)
    def flaky(params: Work) -> Receipt:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return Receipt(run=len(attempts))

    with running_worker(broker):
        assert flaky.call(Work(item="x"), timeout=10).run == 2
    client = redis.Redis.from_url(redis_url)
    assert [k for k in client.scan_iter(match="rpc:idem:*") if k.endswith(b":lock")] == []
    client.close()


def test_plain_actors_are_unaffected(redis_url: str) -> None:
    broker, config = redis_broker(redis_url)
    runs: list[str] = []
    charge = _actor(broker, runs)
    channel = broker.middleware[0].channel
    message = charge.message_with_options(args=(Work(item="p"),))
    with running_worker(broker):
        for _ in range(2):
            key = protocol.reply_key(config.response_key_prefix, uuid.uuid4().hex)
            _deliver(charge, message, key)
            _reply(channel, key)
    assert runs == ["p", "p"]
    assert any(isinstance(m, RPCIdempotency) for m in broker.middleware)
