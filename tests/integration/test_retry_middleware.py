"""RPCRetries / RPCRateLimits against real Redis and real workers (in-process and CLI). The
behavioural tests run on BlockingRedisBroker and on RabbitmqBroker (cooldowns and replies in
Redis, messages in RabbitMQ)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import (
    RateLimitError,
    RPCError,
    RPCErrorCode,
    RPCRemoteError,
    current_message,
    metrics,
    rpc_actor,
)
from rpc_tasks.redis.ratestore import RateStore, cooldown_key

from .support import dead_letters, make_broker, redis_broker, running_worker, unique, wait_until
from .test_cli_and_faults import CLIWorker

pytestmark = pytest.mark.redis


class P(BaseModel):
    n: int = 0


class R(BaseModel):
    attempts: int


def unavailable(retry_after: float | None) -> RPCRemoteError:
    return RPCRemoteError(
        RPCError(code=RPCErrorCode.SERVICE_UNAVAILABLE, message="backend down", retry_after=retry_after)
    )


def timed_remote_error(actor: Any, params: P, timeout: float) -> tuple[RPCRemoteError, float]:
    """``actor.call(params, timeout=timeout)``, which must raise RPCRemoteError: the error,
    and the seconds until the caller heard it."""
    started = time.monotonic()
    with pytest.raises(RPCRemoteError) as info:
        actor.call(params, timeout=timeout)
    return info.value, time.monotonic() - started


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_retry_waits_at_least_retry_after(
    redis_url: str, broker_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpc_tasks.middleware.retries")
    broker, _ = make_broker(redis_url)
    failures: list[float] = []
    starts: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=5, min_backoff=10, max_backoff=50)
    def flaky(params: P) -> R:
        starts.append(time.time())
        if len(starts) <= 2:
            failures.append(time.time())
            raise unavailable(0.5)
        return R(attempts=len(starts))

    with running_worker(broker):
        result = flaky.call(P(), timeout=10)
    assert result.attempts == 3
    gaps = [starts[i + 1] - failures[i] for i in range(2)]
    print(f"\n[retry_after=0.5] gaps between failure and next attempt: {[round(g, 3) for g in gaps]}")
    assert all(gap >= 0.5 for gap in gaps), gaps
    # ...and not absurdly later. With Dramatiq 2.0's RabbitMQ broker the first retry ran ~3 s late
    # in every run here (2.2's: on time); the README promises no upper bound, only "not earlier".
    assert all(gap < (5.0 if broker_kind == "rabbitmq" else 2.0) for gap in gaps), gaps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Retry:")]
    assert len(lines) == 2
    assert f"actor={flaky.actor_name}" in lines[0] and "attempt=1" in lines[0]
    assert "code=service_unavailable" in lines[0] and "delay_ms=" in lines[0]


def test_backoff_without_retry_after_is_exponential_with_additive_jitter(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    from rpc_tasks.middleware import RPCRetries

    retries = next(m for m in broker.middleware if isinstance(m, RPCRetries))

    @rpc_actor(broker=broker, queue_name=unique("q"), min_backoff=100, max_backoff=1000, jitter=0.5)
    def noop(params: P) -> None:
        return None

    class Msg:
        options: dict[str, Any] = {}

    for attempt, floor in [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1000), (9, 1000)]:
        delays = [retries.compute_delay_ms(Msg(), noop, attempt, None) for _ in range(200)]
        assert min(delays) >= floor
        assert max(delays) <= floor * 1.5
        assert len(set(delays)) > 1, "jitter"
    # retry_after wins over a smaller backoff, and is never undercut by jitter
    assert min(retries.compute_delay_ms(Msg(), noop, 0, 2.5) for _ in range(200)) >= 2500
    # a per-message option overrides the actor's
    Msg.options = {"min_backoff": 300}
    assert min(retries.compute_delay_ms(Msg(), noop, 0, None) for _ in range(50)) >= 300


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_non_retryable_error_fails_at_once_and_retry_codes_is_configurable(
    redis_url: str, broker_kind: str
) -> None:
    broker, _ = make_broker(redis_url)
    calls: Counter[str] = Counter()

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=5, min_backoff=10, retry_codes=["timeout"])
    def picky(params: P) -> R:
        calls["picky"] += 1
        raise unavailable(None)  # retryable by default, but not in this actor's retry_codes

    with running_worker(broker):
        exc, elapsed = timed_remote_error(picky, P(), timeout=5)
        assert elapsed < 1.0
    assert exc.error.code is RPCErrorCode.SERVICE_UNAVAILABLE
    assert calls["picky"] == 1


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_call_deadline_returns_last_error_instead_of_retrying_late(redis_url: str, broker_kind: str) -> None:
    broker, _ = make_broker(redis_url)
    calls: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=10, min_backoff=10)
    def slow_backend(params: P) -> R:
        calls.append(time.time())
        raise unavailable(5.0)

    with running_worker(broker):
        exc, elapsed = timed_remote_error(slow_backend, P(), timeout=1.0)
    assert elapsed < 0.5, "the caller hears back now, not after its 1 s timeout or the 5 s retry"
    assert exc.retry_after == 5.0
    assert exc.error.code is RPCErrorCode.SERVICE_UNAVAILABLE
    assert exc.error.details["next_retry_in"] >= 5.0
    assert len(calls) == 1


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_send_keeps_retrying_without_a_deadline(redis_url: str, broker_kind: str) -> None:
    broker, _ = make_broker(redis_url)
    calls: list[float] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=10, min_backoff=10, max_backoff=20)
    def eventually(params: P) -> None:
        calls.append(time.time())
        if len(calls) < 4:
            raise unavailable(0.05)

    with running_worker(broker):
        eventually.send(P())
        wait_until(lambda: len(calls) == 4, timeout=10)
        broker.join(eventually.queue_name, timeout=5000)
    assert len(calls) == 4, "retried until it succeeded, and not after"


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_retries_exhausted_reports_final_error_and_attempts(redis_url: str, broker_kind: str) -> None:
    broker, _ = make_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=2, min_backoff=10, max_backoff=20)
    def always_down(params: P) -> R:
        raise unavailable(0.05)

    with running_worker(broker):
        with pytest.raises(RPCRemoteError) as info:
            always_down.call(P(), timeout=10)
    err = info.value.error
    assert err.code is RPCErrorCode.SERVICE_UNAVAILABLE
    assert err.retry_after == 0.05
    assert err.details["attempts"] == 3
    assert wait_until(lambda: dead_letters(broker, always_down.queue_name) == 1, timeout=5)


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_cooldown_postpones_without_running_and_without_using_retries(
    redis_url: str, broker_kind: str
) -> None:
    broker, _ = make_broker(redis_url)
    runs: list[tuple[float, int, int]] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0, rate_limit_key="shared-api")
    def uses_api(params: P) -> R:
        msg = current_message()
        runs.append((time.time(), msg.options.get("retries", 0), msg.options.get("rpc_postponed_ms", 0)))
        return R(attempts=1)

    store = RateStore(redis.Redis.from_url(redis_url))
    opened = time.time()  # before the cooldown starts on the server (PTTL rounds down to the ms)
    store.open_cooldown(cooldown_key("shared-api"), 800)
    with running_worker(broker, threads=4):
        for i in range(6):
            uses_api.send(P(n=i))
        wait_until(lambda: len(runs) == 6, timeout=10)
    assert all(at >= opened + 0.8 - 0.002 for at, _, _ in runs), (
        "nothing runs during the cooldown",
        opened,
        runs,
    )
    assert all(retries == 0 for _, retries, _ in runs), ("max_retries=0 and still delivered", runs)
    # Postponed (not run, not retried) until the cooldown's end: how long depends on when the
    # worker first saw each message, so only that it was postponed is checked here.
    assert all(postponed > 0 for _, _, postponed in runs), ("postponed, not run", runs)
    # The restart is spread, not a stampede: each message got its own point past the cooldown
    # (checked on what was scheduled: Dramatiq 2.0's RabbitMQ delay queue releases due messages
    # in batches, so run times alone cannot show it there).
    assert len({postponed for _, _, postponed in runs}) > 1, ("the restart is spread", runs)


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_postponement_cap_dead_letters_with_reason(
    redis_url: str, broker_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpc_tasks.middleware.ratelimits")
    broker, _ = make_broker(redis_url)
    runs: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit_key="capped", max_postpone=0.5)
    def capped(params: P) -> R:
        runs.append(1)
        return R(attempts=1)

    RateStore(redis.Redis.from_url(redis_url)).open_cooldown(cooldown_key("capped"), 5000)
    with running_worker(broker):
        capped.send(P())
        wait_until(lambda: dead_letters(broker, capped.queue_name) == 1, timeout=5)
    assert runs == []
    assert any("max_postpone" in r.getMessage() and "Gave up" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_cooldown_past_the_deadline_answers_the_caller_now(redis_url: str, broker_kind: str) -> None:
    broker, _ = make_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit_key="busy")
    def busy(params: P) -> R:
        return R(attempts=1)

    RateStore(redis.Redis.from_url(redis_url)).open_cooldown(cooldown_key("busy"), 5000)
    with running_worker(broker):
        exc, elapsed = timed_remote_error(busy, P(), timeout=1)
        assert elapsed < 0.5
    assert exc.error.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert exc.retry_after is not None and 4.0 < exc.retry_after <= 6.5


@pytest.mark.parametrize("broker_kind", ["blocking", "rabbitmq"], indirect=True)
def test_rate_limit_error_opens_a_shared_cooldown(redis_url: str, broker_kind: str) -> None:
    broker, _ = make_broker(redis_url)
    events: list[tuple[str, dict[str, Any]]] = []

    def listener(event: str, labels: Any) -> None:
        events.append((event, dict(labels)))

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=3, min_backoff=10)
    def limited(params: P) -> R:
        if params.n == 0:
            raise RPCRemoteError(RateLimitError(message="slow down", retry_after=0.6))
        return R(attempts=1)

    metrics.add_listener(listener)
    try:
        with running_worker(broker):
            limited.send(P(n=0))
            store = RateStore(redis.Redis.from_url(redis_url))
            wait_until(lambda: store.cooldown_left(cooldown_key(limited.actor_name)) > 0, timeout=5)
            assert 0 < store.cooldown_left(cooldown_key(limited.actor_name)) <= 600
            wait_until(lambda: any(e == "retry" for e, _ in events), timeout=5)
    finally:
        metrics.remove_listener(listener)
    assert any(e == "cooldown_opened" and lab["actor"] == limited.actor_name for e, lab in events)


@pytest.mark.slow
def test_fleet_respects_cooldowns_of_a_rate_limited_remote(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two worker processes x 2 threads against one remote that serves 5 calls, then blocks
    for 0.5 s. After a block starts (plus 100 ms for calls already in flight) the remote must
    get no call until it ends; every message succeeds; retries are used only by real rate-limit
    answers, never by postponements.

    Messages are sent once both workers consume (their start-up is not part of the wait), and
    the wait fails on a stall (no message finished for 30 s), not on a slow machine."""
    monkeypatch.setenv("CLI_APP_MAINTENANCE_CHANCE", "1000")
    monkeypatch.setenv("CLI_APP_REMOTE_BLOCK_MS", "500")
    monkeypatch.setenv("CLI_APP_REMOTE_RATE_KEY", unique("fake-remote"))
    from tests.integration import cli_app

    total = 30
    client = redis.Redis.from_url(redis_url)
    workers = [CLIWorker(redis_url), CLIWorker(redis_url)]
    try:
        # Each worker process heartbeats (one entry per process) from its first fetch on.
        wait_until(lambda: client.zcard("cli_app:__heartbeats__") == 2, timeout=60, interval=0.1)
        sent = [cli_app.remote_job.send(cli_app.RemoteParams(n=i)).message_id for i in range(total)]
        wait_while_progressing(lambda: client.hlen(cli_app.RESULTS_KEY), total, stall=30.0, cap=180.0)
    finally:
        for w in workers:
            w.stop()
    log = cli_app.remote.log()
    results = {k.decode(): v.decode().split(":") for k, v in client.hgetall(cli_app.RESULTS_KEY).items()}
    assert sorted(results) == sorted(sent)
    assert len({pid for _, _, pid in results.values()}) == 2, "both worker processes took part"
    blocks = [c.at_ms for c in log if c.outcome == "limited"]
    assert blocks, "the remote did rate-limit"
    late = [c for c in log if c.outcome == "during_block" and c.at_ms > c.block_start_ms + 100]
    assert late == [], f"calls reached the remote during an open cooldown: {late}"
    limited_per_message = Counter(c.caller for c in log if c.outcome == "limited")
    postponed = 0
    for message_id, (retries, postponed_ms, _) in results.items():
        during = sum(1 for c in log if c.caller == message_id and c.outcome == "during_block")
        assert int(retries) == limited_per_message[message_id] + during, message_id
        postponed += int(postponed_ms) > 0
    assert postponed > 0, "some messages were postponed (and that used no retries)"
    in_flight = sum(1 for c in log if c.outcome == "during_block")
    print(
        f"\n[fleet] messages={total} remote_calls={len(log)} rate_limited={len(blocks)} "
        f"calls_in_cooldown_after_100ms=0 in_flight_at_block_start={in_flight} "
        f"retries_used={sum(int(r) for r, _, _ in results.values())} messages_postponed={postponed}"
    )


def wait_while_progressing(count: Any, total: int, stall: float, cap: float) -> None:
    """Wait until ``count()`` reaches ``total``; fail when it has not grown for ``stall``
    seconds (a message is stuck) or after ``cap`` seconds in all."""
    started = last_change = time.monotonic()
    seen = count()
    while seen < total:
        now = time.monotonic()
        assert now - last_change < stall, f"stalled at {seen}/{total} for {stall:g}s"
        assert now - started < cap, f"{seen}/{total} after {cap:g}s"
        time.sleep(0.1)
        done = count()
        if done != seen:
            seen, last_change = done, time.monotonic()


@pytest.mark.slow
def test_proactive_rate_limit_holds_two_workers_under_the_rate(redis_url: str) -> None:
    from tests.integration import cli_app

    total = 50
    workers = [CLIWorker(redis_url), CLIWorker(redis_url)]
    try:
        for i in range(total):
            cli_app.paced.send(cli_app.RemoteParams(n=i))
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: client.llen(cli_app.STAMPS_KEY) == total, timeout=60, interval=0.2)
    finally:
        for w in workers:
            w.stop()
    stamps = sorted(float(x.decode().split(":")[0]) for x in client.lrange(cli_app.STAMPS_KEY, 0, -1))
    pids = {x.decode().split(":")[1] for x in client.lrange(cli_app.STAMPS_KEY, 0, -1)}
    assert len(pids) == 2, "both workers ran messages"
    worst = max(sum(1 for t in stamps if s <= t < s + 1.0) for s in stamps)
    assert worst <= 20, f"{worst} runs within one second"
    span = stamps[-1] - stamps[0]
    print(f"\n[proactive] runs={total} worst_1s_window={worst} span={span:.2f}s")
    assert span >= (total - 1) / 20 * 0.98
    assert span < (total - 1) / 20 + 10, "delayed, not starved"


def test_rate_limit_string_is_validated_at_decoration(redis_url: str) -> None:
    from rpc_tasks import RPCConfigurationError

    broker, _ = redis_broker(redis_url)
    with pytest.raises(RPCConfigurationError):

        @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit="fast please")
        def bad(params: P) -> None:
            return None


class _Events:
    """Collects rpc_tasks.metrics events while a test runs."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, labels: Any) -> None:
        self.seen.append((event, dict(labels)))

    def of(self, event: str, actor: str) -> list[dict[str, Any]]:
        return [labels for e, labels in list(self.seen) if e == event and labels.get("actor") == actor]


@pytest.fixture
def events() -> Any:
    listener = _Events()
    metrics.add_listener(listener)
    yield listener
    metrics.remove_listener(listener)


def test_proactive_slot_past_the_deadline_answers_the_caller_now(redis_url: str, events: _Events) -> None:
    """``rate_limit="1/10s"``: a second ``.call()`` whose slot would start after its 2 s deadline
    is not scheduled; the caller hears ``rate_limit_exceeded`` with ``retry_after`` at once."""
    broker, _ = redis_broker(redis_url)
    runs: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit="1/10s", rate_limit_key=unique("paced"))
    def paced(params: P) -> R:
        runs.append(params.n)
        return R(attempts=1)

    with running_worker(broker):
        assert paced.call(P(n=1), timeout=5).attempts == 1
        exc, elapsed = timed_remote_error(paced, P(n=2), timeout=2)
    assert elapsed < 1.5, "answered now, not at the deadline"
    assert exc.error.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert exc.retry_after is not None and 7.0 < exc.retry_after <= 10.5
    assert runs == [1]
    assert [e["reason"] for e in events.of("gave_up", paced.actor_name)] == ["deadline"]


def test_per_message_max_postpone_and_postpone_events(redis_url: str, events: _Events) -> None:
    """``max_postpone`` as a message option caps that message only: during a 1.5 s cooldown
    the message with ``max_postpone=0.5`` is dead-lettered at once (a ``gave_up`` event with
    ``postpone_cap``), the one without it is put back (a ``postpone`` event) and runs."""
    broker, _ = redis_broker(redis_url)
    key = unique("cooling")
    runs: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), rate_limit_key=key)
    def cooled(params: P) -> R:
        runs.append(params.n)
        return R(attempts=1)

    RateStore(redis.Redis.from_url(redis_url)).open_cooldown(cooldown_key(key), 1500)
    with running_worker(broker):
        cooled.send(P(n=1), max_postpone=0.5)
        cooled.send(P(n=2))
        wait_until(lambda: runs == [2], timeout=10)
        wait_until(lambda: dead_letters(broker, cooled.queue_name) == 1, timeout=5)
        broker.join(cooled.queue_name, timeout=10_000)
    assert runs == [2]
    postpones = events.of("postpone", cooled.actor_name)
    assert [(p["reason"], p["key"]) for p in postpones] == [("cooldown", key)]
    assert 1000 < postpones[0]["delay_ms"] <= 1500 + 0.25 * 1500
    assert [g["reason"] for g in events.of("gave_up", cooled.actor_name)] == ["postpone_cap"]


def test_gave_up_event_when_retries_are_exhausted(redis_url: str, events: _Events) -> None:
    broker, _ = redis_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=1, min_backoff=10, max_backoff=20)
    def down(params: P) -> R:
        raise unavailable(None)

    with running_worker(broker):
        with pytest.raises(RPCRemoteError):
            down.call(P(), timeout=10)
    assert len(events.of("retry", down.actor_name)) == 1
    gave_up = events.of("gave_up", down.actor_name)
    assert [(g["reason"], g["code"]) for g in gave_up] == [("retries_exhausted", "service_unavailable")]
