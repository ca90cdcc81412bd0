"""@rpc_actor end to end with in-process workers: every behavioural test runs on our
BlockingRedisBroker, on Dramatiq's plain RedisBroker and on Dramatiq's RabbitmqBroker (replies
over Redis; unique queue names, deleted after the test)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import dramatiq
import pytest
import redis
from pydantic import BaseModel, ValidationError

from rpc_tasks import (
    RateLimitError,
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    protocol,
    rpc_actor,
)

from .support import (
    dead_letters,
    make_broker,
    queue_size,
    reply_keys,
    running_worker,
    twin_broker,
    unique,
    use_broker_kind,
    wait_until,
)

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True, params=["blocking", "plain", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return use_broker_kind(request, monkeypatch, str(request.param))


#: For tests of what only Redis brokers do (their storage, their consumer).
redis_only = pytest.mark.parametrize("broker_kind", ["blocking", "plain"], indirect=True)


class EchoParams(BaseModel):
    message: str


class EchoResult(BaseModel):
    message: str
    length: int


def recording_echo(broker: dramatiq.Broker, **options: Any) -> tuple[Any, list[str]]:
    """An ``echo`` actor on ``broker`` that records each message it runs, and that record."""
    ran: list[str] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), actor_name="echo", **options)
    def echo(params: EchoParams) -> EchoResult:
        ran.append(params.message)
        return EchoResult(message=params.message, length=0)

    return echo, ran


def test_call_returns_typed_result(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def echo(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message, length=len(params.message))

    with running_worker(broker):
        result = echo.call(EchoParams(message="héllo"), timeout=5)
    assert isinstance(result, EchoResult)
    assert result == EchoResult(message="héllo", length=5)


def test_send_is_processed_in_background_and_pushes_no_reply(redis_url: str) -> None:
    broker, config = make_broker(redis_url)
    remember, seen = recording_echo(broker)
    message = remember.send(EchoParams(message="bg"))
    assert isinstance(message, dramatiq.Message)
    assert protocol.OPTION_REPLY_TO not in message.options
    with running_worker(broker):
        wait_until(lambda: seen == ["bg"])
        broker.join(remember.queue_name, timeout=5000)
    assert reply_keys(redis_url, config.response_key_prefix) == []


def test_invalid_params_are_rejected_before_enqueue(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)
    ran: list[EchoParams] = []

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def echo(params: EchoParams) -> EchoResult:
        ran.append(params)
        return EchoResult(message=params.message, length=0)

    with pytest.raises(ValidationError):
        echo.send({"message": ["not", "a", "string"]})
    with pytest.raises(ValidationError):
        echo.call({"wrong": "field"}, timeout=1)
    assert queue_size(broker, echo.queue_name) == 0
    with running_worker(broker):
        # Positive control: a valid message sent after the rejected ones runs, and alone.
        echo.send(EchoParams(message="valid"))
        wait_until(lambda: ran, timeout=10)
        broker.join(echo.queue_name, timeout=5000)
    assert [p.message for p in ran] == ["valid"]


def test_typed_remote_error_reaches_caller_with_code_and_retry_after(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)
    attempts: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=5)
    def limited(params: EchoParams) -> EchoResult:
        attempts.append(time.time())
        raise RPCRemoteError(
            RateLimitError(message="quota used up", retry_after=2.5, retryable=False, details={"quota": 10})
        )

    with running_worker(broker):
        started = time.monotonic()
        with pytest.raises(RPCRemoteError) as info:
            limited.call(EchoParams(message="x"), timeout=5)
        elapsed = time.monotonic() - started
    err = info.value
    assert err.error.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert err.retry_after == 2.5
    assert err.is_retryable is False
    assert err.error.message == "quota used up"
    assert err.error.details["quota"] == 10
    assert len(attempts) == 1, "a non-retryable error must not be retried"
    assert elapsed < 2.0, "a non-retryable error must reach the caller at once"


def test_unhandled_exception_after_retries_becomes_internal_error(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)
    attempts: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=2, min_backoff=10, max_backoff=20)
    def broken(params: EchoParams) -> EchoResult:
        attempts.append(1)
        raise KeyError("missing-thing")

    with running_worker(broker):
        with pytest.raises(RPCRemoteError) as info:
            broken.call(EchoParams(message="x"), timeout=10)
    assert info.value.error.code is RPCErrorCode.INTERNAL_ERROR
    assert "KeyError" in info.value.error.message
    assert info.value.error.details["attempts"] == 3
    assert len(attempts) == 3, "the reply must come only after Dramatiq's retries are used up"


def test_worker_side_validation_error_reply_for_malformed_message(redis_url: str) -> None:
    broker, config = make_broker(redis_url)
    ran: list[object] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=3)
    def echo(params: EchoParams) -> EchoResult:
        ran.append(params)
        return EchoResult(message=params.message, length=0)

    # A producer that bypasses validation (another language, an old client, a bug).
    key = protocol.reply_key(config.response_key_prefix, "bad-message-1")
    bad = dramatiq.Message(
        queue_name=echo.queue_name,
        actor_name=echo.actor_name,
        args=({"message": 12},),
        kwargs={},
        options={protocol.OPTION_REPLY_TO: key, protocol.OPTION_DEADLINE: time.time() + 10},
        message_id="bad-message-1",
    )
    broker.enqueue(bad)
    channel = broker.middleware[0].channel
    with running_worker(broker):
        raw = channel.wait(key, 5)
    assert raw is not None
    response = protocol.decode_response(raw)
    assert response.success is False and response.error is not None
    assert response.error.code is RPCErrorCode.VALIDATION_ERROR
    assert response.error.details["errors"][0]["loc"] == ["message"]
    assert ran == [], "a malformed message is never half-processed"


def test_timeout_has_millisecond_precision(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)
    release = threading.Event()

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    def slow(params: EchoParams) -> EchoResult:
        release.wait(5)
        return EchoResult(message=params.message, length=0)

    with running_worker(broker):
        for timeout in (0.05, 0.123, 0.25):
            started = time.perf_counter()
            with pytest.raises(RPCTimeoutError) as info:
                slow.call(EchoParams(message="x"), timeout=timeout)
            elapsed = time.perf_counter() - started
            assert info.value.timeout_seconds == timeout
            assert info.value.method == slow.actor_name
            assert timeout <= elapsed < timeout + 0.05, (timeout, elapsed)
        release.set()


def test_expired_call_is_skipped_not_executed(redis_url: str) -> None:
    broker, config = make_broker(redis_url)
    echo, ran = recording_echo(broker)
    # No worker yet: the caller gives up after 0.1 s.
    with pytest.raises(RPCTimeoutError):
        echo.call(EchoParams(message="too late"), timeout=0.1)
    echo.send(EchoParams(message="fresh"))
    replies = broker.middleware[0]
    with running_worker(broker):
        wait_until(lambda: ran == ["fresh"])
        broker.join(echo.queue_name, timeout=5000)
    assert ran == ["fresh"], "the expired call must not run"
    assert replies.counters["expired_skipped"] == 1
    assert reply_keys(redis_url, config.response_key_prefix) == []


def test_unknown_actor_gets_prompt_method_not_found(redis_url: str) -> None:
    queue = unique("q")
    worker_broker, config = make_broker(redis_url)
    caller_broker = twin_broker(worker_broker, config)

    @rpc_actor(broker=worker_broker, queue_name=queue, actor_name="known")
    def known(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message, length=0)

    @rpc_actor(broker=caller_broker, queue_name=queue, actor_name="ghost")
    def ghost(params: EchoParams) -> EchoResult:  # only the caller knows this one
        raise AssertionError("never runs")

    with running_worker(worker_broker):
        started = time.monotonic()
        with pytest.raises(RPCRemoteError) as info:
            ghost.call(EchoParams(message="boo"), timeout=10)
        elapsed = time.monotonic() - started
        assert known.call(EchoParams(message="still fine"), timeout=5).message == "still fine"
    assert info.value.error.code is RPCErrorCode.METHOD_NOT_FOUND
    assert "ghost" in info.value.error.message
    assert elapsed < 3
    # Dead-lettered, not silently acked.
    assert wait_until(lambda: dead_letters(worker_broker, queue) == 1, timeout=5)


def test_reply_keys_always_have_a_ttl(redis_url: str) -> None:
    broker, config = make_broker(redis_url)
    gate = threading.Event()

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    def gated(params: EchoParams) -> EchoResult:
        if params.message == "late":
            gate.wait(5)
        return EchoResult(message=params.message, length=0)

    with running_worker(broker):
        gated.call(EchoParams(message="warm"), timeout=10)  # consumers up: "late" starts in time
        # The caller gives up; the worker's reply arrives later and must expire on its own.
        with pytest.raises(RPCTimeoutError):
            gated.call(EchoParams(message="late"), timeout=0.3)
        gate.set()
        keys = wait_until(lambda: reply_keys(redis_url, config.response_key_prefix), timeout=5)
        for i in range(20):
            gated.call(EchoParams(message=str(i)), timeout=5)
    client = redis.Redis.from_url(redis_url)
    keys = reply_keys(redis_url, config.response_key_prefix)
    assert len(keys) == 1, "only the late reply is left; answered calls leave nothing"
    for key in keys:
        ttl = client.ttl(key)
        assert 0 < ttl <= config.response_key_ttl


@redis_only
def test_structurally_invalid_message_is_dead_lettered_with_an_error_reply(
    redis_url: str, broker_kind: str
) -> None:
    """Valid JSON that is not a valid Dramatiq message (here: no ``args``) must not crash the
    consumer or loop: the caller gets ``invalid_request`` and the message is dead-lettered."""
    broker, config = make_broker(redis_url)
    echo, ran = recording_echo(broker)
    key = protocol.reply_key(config.response_key_prefix, "broken-1")
    good = echo.message_with_options(args=(EchoParams(message="x"),))
    good = good.copy(message_id="broken-1", options={protocol.OPTION_REPLY_TO: key})
    enqueued = broker.enqueue(good)
    redis_id = enqueued.options["redis_message_id"]
    # Corrupt the stored message the way a buggy producer would: drop the "args" field.
    client = redis.Redis.from_url(redis_url)
    msgs_key = f"{broker.namespace}:{echo.queue_name}.msgs"
    stored = json.loads(client.hget(msgs_key, redis_id))
    del stored["args"]
    client.hset(msgs_key, redis_id, json.dumps(stored))

    channel = broker.middleware[0].channel
    with running_worker(broker):
        raw = channel.wait(key, 5)
        assert echo.call(EchoParams(message="after"), timeout=5).message == "after"
    assert raw is not None
    response = protocol.decode_response(raw)
    assert response.error is not None and response.error.code is RPCErrorCode.INVALID_REQUEST
    assert "args" in response.error.message
    assert ran == ["after"]
    assert client.zcard(f"{broker.namespace}:{echo.queue_name}.XQ") == 1


def test_call_many_returns_results_in_order_with_errors_in_place(redis_url: str) -> None:
    broker, _ = make_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
    def maybe(params: EchoParams) -> EchoResult:
        if params.message == "bad":
            raise RPCRemoteError.from_code("validation_error", "no bad words")
        if params.message == "slow":
            time.sleep(1.0)
        return EchoResult(message=params.message, length=len(params.message))

    words = [f"w{i}" for i in range(60)]
    with pytest.raises(ValidationError):
        maybe.call_many([*map(lambda w: EchoParams(message=w), words), {"message": 1}], timeout=5)
    assert queue_size(broker, maybe.queue_name) == 0, "nothing enqueued when one params object is invalid"
    with running_worker(broker, threads=4):
        results = maybe.call_many([EchoParams(message=w) for w in words], timeout=10)
        assert [r.message for r in results] == words
        mixed = maybe.call_many(
            [EchoParams(message="a"), EchoParams(message="bad"), EchoParams(message="slow")],
            timeout=0.5,
            return_exceptions=True,
        )
        assert mixed[0].message == "a"
        assert isinstance(mixed[1], RPCRemoteError) and mixed[1].code is RPCErrorCode.VALIDATION_ERROR
        assert isinstance(mixed[2], RPCTimeoutError)
        with pytest.raises(RPCRemoteError):
            maybe.call_many([EchoParams(message="b"), EchoParams(message="bad")], timeout=5)
        assert maybe.call_many([], timeout=1) == []


@pytest.mark.parametrize("broker_kind", ["blocking"], indirect=True)
def test_delayed_messages_run_on_time_when_idle(redis_url: str, broker_kind: str) -> None:
    """The blocking consumer must not oversleep a delayed message's eta (retries and
    postponements use delays). Only BlockingRedisBroker promises this: Dramatiq's own brokers
    poll, and that they never run a message early is Dramatiq's to test."""
    broker, _ = make_broker(redis_url)
    ran: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def later(params: EchoParams) -> None:
        ran.append(time.time())

    with running_worker(broker, worker_timeout=1000):  # Dramatiq's default: idle waits up to 1 s
        time.sleep(0.3)  # idle
        sent = time.time()
        later.send(EchoParams(message="x"), delay=400)
        wait_until(lambda: ran, timeout=5)
    lateness = ran[0] - (sent + 0.4)
    assert ran[0] >= sent + 0.4
    assert lateness < 0.3, lateness


def test_reply_address_outside_the_prefix_is_never_written(redis_url: str) -> None:
    """Security: a message whose ``rpc_reply_to`` is not under ``response_key_prefix`` (a
    forged or misconfigured producer pointing at a key the application owns) gets no write
    there; the worker logs it and counts it."""
    broker, config = make_broker(redis_url)
    echo, _ = recording_echo(broker, max_retries=0)
    client = redis.Redis.from_url(redis_url)
    victim = unique("app:session")
    client.set(victim, "precious")
    forged = echo.message_with_options(
        args=(EchoParams(message="forged").model_dump(),),
        **{protocol.OPTION_REPLY_TO: victim, protocol.OPTION_DEADLINE: time.time() + 30},
    )
    broker.enqueue(forged)
    replies = broker.middleware[0]
    with running_worker(broker):
        wait_until(lambda: replies.counters["bad_reply_to"] == 1, timeout=10)
        # Positive control: a proper call on the same worker is answered.
        assert echo.call(EchoParams(message="fine"), timeout=10).message == "fine"
    assert client.get(victim) == b"precious" and client.type(victim) == b"string"
    assert reply_keys(redis_url, config.response_key_prefix) == []
    client.close()
