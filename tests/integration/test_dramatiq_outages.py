"""Short Redis outages on the Dramatiq path (private redis-server, killed and restarted):
``.send()`` rides them out for ``send_retry_seconds``, ``.call()`` fails fast, workers serve
again right after Redis is back."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel

from rpc_tasks import RPCConnectionError, rpc_actor

from .support import PrivateRedis, redis_broker, running_worker, unique, wait_until

pytestmark = pytest.mark.redis


class EchoParams(BaseModel):
    message: str


class EchoResult(BaseModel):
    message: str


def test_send_rides_out_a_short_outage_call_fails_fast_and_workers_resume_at_once() -> None:
    with PrivateRedis() as server:
        broker, _ = redis_broker(server.url())
        ran: dict[str, float] = {}

        @rpc_actor(broker=broker, queue_name=unique("q"))
        def echo(params: EchoParams) -> EchoResult:
            ran[params.message] = time.monotonic()
            return EchoResult(message=params.message)

        with running_worker(broker, worker_timeout=1000):
            assert echo.call(EchoParams(message="before"), timeout=5).message == "before"
            server.kill()
            started = time.monotonic()
            with pytest.raises(RPCConnectionError):
                echo.call(EchoParams(message="down"), timeout=5)
            assert time.monotonic() - started < 1.0, ".call() must fail fast during an outage"
            sent: list[Any] = []
            sender = threading.Thread(target=lambda: sent.append(echo.send(EchoParams(message="during"))))
            sender.start()
            time.sleep(3.3)  # longer than Dramatiq's consumer restart delay (3 s)
            assert not sent, ".send() is still retrying"
            server.start()
            back = time.monotonic()
            sender.join(10)
            assert sent, ".send() gave up although Redis came back within send_retry_seconds"
            wait_until(lambda: "during" in ran, timeout=10)
            resumed = ran["during"] - back
            assert echo.call(EchoParams(message="after"), timeout=5).message == "after"
        assert resumed < 1.0, f"the worker served again {resumed:.2f}s after Redis was back"


def test_send_gives_up_after_send_retry_seconds() -> None:
    with PrivateRedis() as server:
        broker, config = redis_broker(server.url())
        broker.middleware[0]._config = config.model_copy(update={"send_retry_seconds": 0.5})

        @rpc_actor(broker=broker, queue_name=unique("q"))
        def echo(params: EchoParams) -> None:
            pass

        server.kill()
        started = time.monotonic()
        with pytest.raises(RPCConnectionError):
            echo.send(EchoParams(message="x"))
        took = time.monotonic() - started
    assert 0.4 <= took < 3.0


def test_a_short_delay_sent_after_a_long_one_runs_on_time(redis_url: str) -> None:
    """The delay-queue consumer holds a message due in 950 ms; a 50 ms one sent right after
    must not wait for the first one's eta (retries and postponements are delayed messages)."""
    broker, _ = redis_broker(redis_url)
    ran: dict[str, float] = {}

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def later(params: EchoParams) -> None:
        ran[params.message] = time.time()

    lateness = []
    with running_worker(broker, worker_timeout=1000):
        time.sleep(0.3)
        for round_ in range(3):
            later.send(EchoParams(message=f"long{round_}"), delay=950)
            time.sleep(0.1)  # the long one is now held by the delay-queue consumer
            sent = time.time()
            later.send(EchoParams(message=f"short{round_}"), delay=50)
            wait_until(lambda r=round_: f"long{r}" in ran and f"short{r}" in ran, timeout=10)
            lateness.append(ran[f"short{round_}"] - (sent + 0.05))
    assert max(lateness) < 0.3, lateness


def test_a_retry_scheduled_while_redis_blips_is_not_lost(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run fails (retryable) and re-enqueueing its retry fails twice (Redis
    unreachable): the retry is still scheduled and runs, instead of the message being acked
    as if it had succeeded."""
    import redis as redis_lib

    broker, _ = redis_broker(redis_url)
    attempts: list[int] = []

    @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=3, min_backoff=10, max_backoff=10)
    def flaky(params: EchoParams) -> EchoResult:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return EchoResult(message=params.message)

    real_enqueue = broker.enqueue
    failures = [redis_lib.ConnectionError("down"), redis_lib.ConnectionError("still down")]

    def blipping_enqueue(message: Any, *, delay: Any = None) -> Any:
        if delay is not None and failures:
            raise failures.pop(0)
        return real_enqueue(message, delay=delay)

    monkeypatch.setattr(broker, "enqueue", blipping_enqueue)
    with running_worker(broker):
        flaky.send(EchoParams(message="x"))
        wait_until(lambda: len(attempts) == 2, timeout=10)
    assert failures == []
