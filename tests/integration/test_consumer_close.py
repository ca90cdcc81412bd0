"""Nothing a ``BlockingRedisBroker`` consumer fetched stays in a live worker's ack set unheld:
when Dramatiq closes the consumer (its consumer thread restarts it after an error, or the worker
stops), messages fetched but not handed out yet and the delayed messages of a delay queue (which
Dramatiq keeps only in its consumer thread's memory) go back to the queue; and so do messages a
fetch moved there when the wait before it was cut on the client side."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.common import dq_name

from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import unique

pytestmark = pytest.mark.redis


def _setup(redis_url: str) -> tuple[BlockingRedisBroker, Any, str]:
    broker = BlockingRedisBroker(url=redis_url, namespace=unique("ns"))
    queue = unique("q")

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name=unique("job"))
    def job(n: int) -> None:
        pass

    return broker, job, queue


def _acks(client: redis.Redis, broker: BlockingRedisBroker, queue: str) -> set[bytes]:
    return set(client.smembers(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue}"))


def _queued(client: redis.Redis, broker: BlockingRedisBroker, queue: str) -> list[bytes]:
    return list(client.lrange(f"{broker.namespace}:{queue}", 0, -1))


def _next_message(consumer: Any) -> Any:
    for _ in range(50):
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError("no message fetched")


def test_closing_a_delay_queue_consumer_requeues_the_delayed_messages_it_handed_out(redis_url: str) -> None:
    broker, job, queue = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        sent = job.send_with_options(args=(1,), delay=60_000)
        delay_queue = dq_name(queue)
        consumer = broker.consume(delay_queue, prefetch=10, timeout=100)
        message = _next_message(consumer)
        rid = message.options["redis_message_id"].encode()
        assert message.message_id == sent.message_id
        # Handed out: held by Dramatiq's consumer thread (its delay queue), in our ack set.
        assert _acks(client, broker, delay_queue) == {rid} and _queued(client, broker, delay_queue) == []
        consumer.close()  # e.g. Dramatiq restarting the consumer after a connection error
        assert _acks(client, broker, delay_queue) == set()
        assert _queued(client, broker, delay_queue) == [rid]
        again = _next_message(broker.consume(delay_queue, prefetch=10, timeout=100))
        assert again.message_id == sent.message_id and again.options["eta"] == message.options["eta"]
    finally:
        broker.close()
        client.close()


def test_closing_a_consumer_requeues_what_it_fetched_but_did_not_hand_out(redis_url: str) -> None:
    broker, job, queue = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        for n in range(3):
            job.send(n)
        consumer = broker.consume(queue, prefetch=10, timeout=100)
        first = _next_message(consumer)  # one fetch of all three: one handed out, two cached
        handed_out = first.options["redis_message_id"].encode()
        assert len(_acks(client, broker, queue)) == 3
        consumer.close()
        # The one a worker thread has stays in the ack set (it acks it later); the others are back.
        assert _acks(client, broker, queue) == {handed_out}
        assert len(_queued(client, broker, queue)) == 2 and handed_out not in _queued(client, broker, queue)
    finally:
        broker.close()
        client.close()


def test_a_wait_cut_after_redis_ran_the_fetch_behind_it_loses_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delay-queue consumer waits for its earliest eta with a client-side cut that drops
    the connection, and the fetch pipelined behind the BLPOP with it. When a wake-up token
    arrived just before the cut, Redis had run that fetch: its messages must not stay in the
    ack set of a live worker (they did, held past their eta for good)."""
    import time

    from rpc_tasks.redis import broker as broker_module

    broker, job, queue = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    delay_queue = dq_name(queue)
    try:
        job.send_with_options(args=(1,), delay=600)  # A: due soon, so the next wait is cut
        consumer = broker.consume(delay_queue, prefetch=10, timeout=1000)
        held = _next_message(consumer).options["redis_message_id"].encode()
        later = job.send_with_options(args=(2,), delay=60_000)  # B: its wake-up token ends the BLPOP

        def cut_after_redis_ran_both(conn: Any, deadline: float) -> bool:
            time.sleep(0.2)  # Redis returns the BLPOP (token there) and runs the fetch meanwhile
            return False  # ... and the wait is cut anyway, as at a deadline

        monkeypatch.setattr(broker_module, "wait_readable", cut_after_redis_ran_both)
        assert next(consumer) is None  # the cut wait
        monkeypatch.undo()
        assert _acks(client, broker, delay_queue) == {held}  # B is not held by anybody ...
        queued = _queued(client, broker, delay_queue)
        assert len(queued) == 1  # ... it is back on the delay queue
        again = _next_message(consumer)
        assert again.message_id == later.message_id
    finally:
        broker.close()
        client.close()
