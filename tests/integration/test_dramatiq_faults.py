"""Unprocessable messages on the default broker (``BlockingRedisBroker``): whatever is pushed
straight into Dramatiq's Redis structures, the worker dead-letters it with a logged reason,
answers a readable reply address with an error, and keeps serving (no leaked prefetch slot, no
dead worker thread, no stranded batch-mate)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import dramatiq
import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCErrorCode, protocol, rpc_actor
from rpc_tasks.redis.broker import BlockingRedisBroker, wake_key

from .support import redis_broker, running_worker, unique, wait_until

pytestmark = pytest.mark.redis

THREADS = 2


class EchoParams(BaseModel):
    message: str


class EchoResult(BaseModel):
    message: str


def _setup(redis_url: str, **kwargs: Any) -> tuple[BlockingRedisBroker, Any, Any, list[str]]:
    broker, config = redis_broker(redis_url, **kwargs)
    assert isinstance(broker, BlockingRedisBroker)
    ran: list[str] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), actor_name="echo", max_retries=0)
    def echo(params: EchoParams) -> EchoResult:
        ran.append(params.message)
        return EchoResult(message=params.message)

    return broker, config, echo, ran


def _push_raw(client: redis.Redis, broker: BlockingRedisBroker, queue: str, data: bytes) -> str:
    """Store ``data`` the way Dramatiq's enqueue script does, under a fresh Redis id."""
    rid = str(uuid.uuid4())
    client.hset(f"{broker.namespace}:{queue}.msgs", rid, data)
    client.rpush(f"{broker.namespace}:{queue}", rid)
    client.lpush(wake_key(broker.namespace, queue), "1")
    return rid


def _message(echo: Any, reply_to: str | None, message_id: str, **options: Any) -> dict[str, Any]:
    msg = echo.message_with_options(args=(EchoParams(message="bad"),))
    fields: dict[str, Any] = msg.asdict()
    fields["message_id"] = message_id
    fields["options"] = dict(options)
    if reply_to is not None:
        fields["options"][protocol.OPTION_REPLY_TO] = reply_to
    return fields


def _bad_payloads(echo: Any, prefix: str) -> dict[str, tuple[bytes, str | None]]:
    """name -> (raw bytes, the reply key a caller would wait on, or None)."""
    out: dict[str, tuple[bytes, str | None]] = {}

    def add(name: str, build: Any) -> None:
        mid = f"{name}-{uuid.uuid4().hex[:6]}"
        key = protocol.reply_key(prefix, mid)
        out[name] = (build(mid, key), key)

    add(
        "not_json",
        lambda mid, key: (
            b'{"message_id":"%s","options":{"rpc_reply_to":"%s"} garbage' % (mid.encode(), key.encode())
        ),
    )
    out["json_array"] = (b"[1, 2, 3]", None)
    add("throws_string", lambda mid, key: json.dumps(_message(echo, key, mid, throws="ValueError")).encode())
    add("retries_string", lambda mid, key: json.dumps(_message(echo, key, mid, retries="x")).encode())
    add("retry_codes_int", lambda mid, key: json.dumps(_message(echo, key, mid, retry_codes=5)).encode())
    add("min_backoff_string", lambda mid, key: json.dumps(_message(echo, key, mid, min_backoff="x")).encode())

    def other_queue(mid: str, key: str) -> bytes:
        fields = _message(echo, key, mid)
        fields["queue_name"] = "some-queue-nobody-consumes"
        return json.dumps(fields).encode()

    add("unknown_queue", other_queue)

    def unknown_actor(mid: str, key: str) -> bytes:
        fields = _message(echo, key, mid)
        fields["actor_name"] = "no_such_actor"
        return json.dumps(fields).encode()

    add("unknown_actor", unknown_actor)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "not_json",
        "json_array",
        "throws_string",
        "retries_string",
        "retry_codes_int",
        "min_backoff_string",
        "unknown_queue",
        "unknown_actor",
    ],
)
def test_unprocessable_messages_are_dead_lettered_and_the_worker_keeps_serving(
    redis_url: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker, config, echo, ran = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    count = THREADS * 2 + 2  # more than the prefetch: a leaked slot per message would stall it
    keys = []
    for _ in range(count):
        data, key = _bad_payloads(echo, config.response_key_prefix)[case]
        _push_raw(client, broker, echo.queue_name, data)
        keys.append(key)
    channel = broker.middleware[0].channel
    caplog.set_level(logging.INFO)
    with running_worker(broker, threads=THREADS, worker_timeout=100) as worker:
        for key in keys:
            if key is None:
                continue
            raw = channel.wait(key, 10)
            assert raw is not None, f"{case}: no error reply"
            response = protocol.decode_response(raw)
            assert response.error is not None
            assert response.error.code in (RPCErrorCode.INVALID_REQUEST, RPCErrorCode.METHOD_NOT_FOUND)
        # The worker keeps serving: every thread alive, a normal call answered.
        assert echo.call(EchoParams(message="after"), timeout=10).message == "after"
        assert all(t.is_alive() for t in worker.workers), f"{case}: a worker thread died"
        xq = f"{broker.namespace}:{echo.queue_name}.XQ"
        wait_until(lambda: client.zcard(xq) == count, timeout=10)
    assert ran == ["after"]
    assert client.hlen(f"{broker.namespace}:{echo.queue_name}.msgs") == 0
    assert list(client.scan_iter(match=f"{broker.namespace}:__acks__*")) == [] or all(
        client.scard(k) == 0 for k in client.scan_iter(match=f"{broker.namespace}:__acks__*")
    )
    assert "dead-letter" in caplog.text
    client.close()


def test_a_message_without_redis_message_id_never_leaks_a_prefetch_slot(redis_url: str) -> None:
    """A foreign producer's message lacking ``redis_message_id`` is processed under the id its
    queue entry has (the fetch tells it), acked, and never holds a slot: more of them than the
    prefetch do not stall the consumer."""
    broker, _, echo, ran = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    count = THREADS * 2 + 3
    for i in range(count):
        msg = echo.message_with_options(args=(EchoParams(message=f"f{i}"),)).asdict()
        msg["options"] = {}
        _push_raw(client, broker, echo.queue_name, json.dumps(msg).encode())
    with running_worker(broker, threads=THREADS, worker_timeout=100):
        wait_until(lambda: len(ran) == count, timeout=10)
        assert echo.call(EchoParams(message="after"), timeout=10).message == "after"
    assert sorted(ran) == sorted([f"f{i}" for i in range(count)] + ["after"])
    assert client.hlen(f"{broker.namespace}:{echo.queue_name}.msgs") == 0
    client.close()


def test_a_bad_message_does_not_strand_the_valid_messages_of_its_batch(redis_url: str) -> None:
    broker, _, echo, ran = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    _push_raw(client, broker, echo.queue_name, b"\xff not json at all")
    for i in range(3):
        echo.send(EchoParams(message=f"v{i}"))
    started = time.monotonic()
    with running_worker(broker, threads=THREADS, worker_timeout=100):
        wait_until(lambda: len(ran) == 3, timeout=10)
        elapsed = time.monotonic() - started
        xq = f"{broker.namespace}:{echo.queue_name}.XQ"
        wait_until(lambda: client.zcard(xq) == 1, timeout=10)
    assert sorted(ran) == ["v0", "v1", "v2"]
    assert elapsed < 8, "the valid messages waited for a consumer restart"
    client.close()


def test_a_message_over_the_size_limit_is_dead_lettered_before_decoding(redis_url: str) -> None:
    broker, config, echo, ran = _setup(redis_url)
    broker.max_message_bytes = 64 * 1024
    client = redis.Redis.from_url(redis_url)
    mid = "big-" + uuid.uuid4().hex[:6]
    key = protocol.reply_key(config.response_key_prefix, mid)
    fields = _message(echo, key, mid)
    fields["args"] = [{"message": "x" * 200_000}]
    _push_raw(client, broker, echo.queue_name, json.dumps(fields).encode())
    channel = broker.middleware[0].channel
    with running_worker(broker, threads=THREADS, worker_timeout=100):
        raw = channel.wait(key, 10)
        assert echo.call(EchoParams(message="after"), timeout=10).message == "after"
    assert raw is not None
    response = protocol.decode_response(raw)
    assert response.error is not None and response.error.code is RPCErrorCode.INVALID_REQUEST
    assert "bytes" in response.error.message
    assert ran == ["after"]
    assert client.zcard(f"{broker.namespace}:{echo.queue_name}.XQ") == 1
    client.close()


def test_worker_threads_survive_whatever_the_options(redis_url: str) -> None:
    """Plain check of the thread count after the nastiest options (kept separate from the
    per-case test so a regression names itself)."""
    broker, _, echo, _ = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    for options in ({"throws": "x"}, {"throws": ["ValueError"]}, {"retry_when": "x"}, {"pipe_target": 5}):
        fields = _message(echo, None, uuid.uuid4().hex, **options)
        _push_raw(client, broker, echo.queue_name, json.dumps(fields).encode())
    with running_worker(broker, threads=THREADS, worker_timeout=100) as worker:
        wait_until(lambda: client.zcard(f"{broker.namespace}:{echo.queue_name}.XQ") == 4, timeout=10)
        assert echo.call(EchoParams(message="ok"), timeout=10).message == "ok"
        assert all(t.is_alive() for t in worker.workers)
    assert isinstance(dramatiq.get_encoder(), object)
    client.close()


# -- a crashed worker's messages ----------------------------------------------------------------


def test_a_dead_workers_messages_are_requeued_within_two_heartbeat_timeouts_when_idle(
    redis_url: str,
) -> None:
    """A worker fetched three messages and died (its heartbeat stops, its ack set stays): a
    live, otherwise idle worker runs them again within 2 x heartbeat_timeout."""
    broker, _, echo, ran = _setup(redis_url, heartbeat_timeout=2000)
    for i in range(3):
        echo.send(EchoParams(message=f"d{i}"))
    dead = BlockingRedisBroker(url=redis_url, namespace=broker.namespace, heartbeat_timeout=2000)
    assert len(dead.do_fetch(echo.queue_name, 3)) == 3  # now parked in the dead worker's ack set
    died = time.monotonic()
    with running_worker(broker, threads=THREADS, worker_timeout=100):
        wait_until(lambda: len(ran) == 3, timeout=2 * 2.0 + 2.0)
        recovered = time.monotonic() - died
    assert sorted(ran) == ["d0", "d1", "d2"]
    assert recovered < 2 * 2.0 + 1.0  # 2 x heartbeat_timeout, plus room for a loaded machine


def test_a_busy_worker_keeps_its_heartbeat_so_its_messages_never_run_twice(redis_url: str) -> None:
    """All threads busy with messages longer than heartbeat_timeout and the prefetch full: the
    worker still heartbeats, so another process's maintenance does not requeue its messages."""
    broker, _ = redis_broker(redis_url, heartbeat_timeout=1000)
    runs: list[str] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    def slow(params: EchoParams) -> None:
        runs.append(params.message)
        time.sleep(1.6)

    for i in range(2):
        slow.send(EchoParams(message=f"s{i}"))
    other = BlockingRedisBroker(url=redis_url, namespace=broker.namespace, heartbeat_timeout=1000)
    with running_worker(broker, threads=1, worker_timeout=100):
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            other.run_maintenance(slow.queue_name)
            time.sleep(0.1)
        wait_until(lambda: len(runs) >= 2, timeout=10)
    assert sorted(runs) == ["s0", "s1"]


def test_a_message_without_a_wake_token_is_fetched_within_a_worker_timeout(redis_url: str) -> None:
    """Requeued messages (maintenance, another broker) come without a wake-up token: an idle
    consumer still fetches them when its wait times out, also with a short worker_timeout."""
    broker, _, echo, ran = _setup(redis_url)
    client = redis.Redis.from_url(redis_url)
    with running_worker(broker, threads=THREADS, worker_timeout=100):
        time.sleep(0.3)  # idle: the consumer blocks on its wake list
        msg = echo.message_with_options(args=(EchoParams(message="tokenless"),)).asdict()
        rid = str(uuid.uuid4())
        msg["options"] = {"redis_message_id": rid}
        client.hset(f"{broker.namespace}:{echo.queue_name}.msgs", rid, json.dumps(msg))
        client.rpush(f"{broker.namespace}:{echo.queue_name}", rid)  # no wake-up token
        wait_until(lambda: ran == ["tokenless"], timeout=2.0)
    client.close()
    assert ran == ["tokenless"]
