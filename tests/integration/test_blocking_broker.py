"""BlockingRedisBroker specifics against the real Redis: the pipelined wake-up + fetch, messages
that arrive without a wake-up token, and ``.call()`` replies pushed together with the ack."""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker, wake_key

from .support import PrivateRedis, redis_broker, running_worker, unique, wait_until

pytestmark = pytest.mark.redis


class EchoParams(BaseModel):
    message: str


class EchoResult(BaseModel):
    message: str


def _echo_actor(broker: dramatiq.Broker, queue: str) -> Any:
    @rpc_actor(broker=broker, queue_name=queue, actor_name="echo")
    def echo(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message)

    return echo


def _commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_call_pushes_the_reply_with_the_ack_in_one_script() -> None:
    """Same Redis for replies and broker: the reply goes out in the ack's script call, so a call
    costs no MULTI/EXEC, and the message is acked by the time its reply is read. A private
    redis-server, since ``INFO commandstats`` counts the whole server's commands."""
    with PrivateRedis() as server:
        url = server.url(db=1)
        broker, _ = redis_broker(url)
        assert isinstance(broker, BlockingRedisBroker)
        queue = unique("q")
        echo = _echo_actor(broker, queue)
        client = redis.Redis.from_url(url)
        with running_worker(broker, worker_timeout=1000):
            assert echo.call(EchoParams(message="warm"), timeout=5).message == "warm"
            before = _commands(client)
            for i in range(20):
                assert echo.call(EchoParams(message=f"m{i}"), timeout=5).message == f"m{i}"
                # Acked atomically with the reply: nothing of this message is left in Redis.
                assert client.hlen(f"{broker.namespace}:{queue}.msgs") == 0
            after = _commands(client)
        assert after["evalsha"] - before["evalsha"] >= 20, "the counter sees the calls' scripts"
        assert after.get("exec", 0) - before.get("exec", 0) == 0
        assert broker._pending_replies == {}
        client.close()


def test_reply_on_another_redis_db_is_pushed_separately(redis_url: str, second_redis_url: str) -> None:
    """A reply channel on another database cannot share the ack's script: the worker pushes the
    reply itself, and the call still works."""
    config = WebSocketRPCConfig(redis_url=second_redis_url, response_key_prefix=unique("test:resp") + ":")
    broker = BlockingRedisBroker(url=redis_url, namespace=unique("ns"))
    setup_broker(broker, config=config, set_global=False)
    echo = _echo_actor(broker, unique("q"))
    with running_worker(broker):
        assert echo.call(EchoParams(message="elsewhere"), timeout=5).message == "elsewhere"
    assert broker._pending_replies == {}


def test_reply_survives_an_ack_that_fails_once(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq retries post-processing after a connection error; the deferred reply is kept
    and goes out with the retried ack."""
    broker, _ = redis_broker(redis_url)
    assert isinstance(broker, BlockingRedisBroker)
    echo = _echo_actor(broker, unique("q"))
    real_finish = BlockingRedisBroker.finish
    failures: list[str] = []

    def flaky_finish(self: BlockingRedisBroker, command: str, queue_name: str, rid: str) -> None:
        if not failures:
            failures.append(rid)
            raise redis.ConnectionError("simulated: connection lost during ack")
        real_finish(self, command, queue_name, rid)

    monkeypatch.setattr(BlockingRedisBroker, "finish", flaky_finish)
    monkeypatch.setattr("dramatiq.worker.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.05)
    with running_worker(broker):
        assert echo.call(EchoParams(message="again"), timeout=5).message == "again"
    assert len(failures) == 1
    assert broker._pending_replies == {}


def test_message_without_wake_token_is_fetched_within_worker_timeout(redis_url: str) -> None:
    """Tokens are hints: a message enqueued by Dramatiq's plain RedisBroker (no token) into a
    queue whose consumer is blocked still runs, at the latest when the wait times out."""
    namespace = unique("ns")
    queue = unique("q")
    blocking = BlockingRedisBroker(url=redis_url, namespace=namespace)
    setup_broker(blocking, config=WebSocketRPCConfig(redis_url=redis_url), set_global=False)
    plain = RedisBroker(url=redis_url, namespace=namespace)
    setup_broker(plain, config=WebSocketRPCConfig(redis_url=redis_url), set_global=False)
    ran: list[float] = []

    def record(params: EchoParams) -> None:
        ran.append(time.monotonic())

    rpc_actor(broker=blocking, queue_name=queue, actor_name="record")(record)
    sender = rpc_actor(broker=plain, queue_name=queue, actor_name="record")(record)
    with running_worker(blocking, worker_timeout=300):
        time.sleep(0.4)  # the consumer is blocked on its wake-up list by now
        sent = time.monotonic()
        sender.send(EchoParams(message="tokenless"))
        wait_until(lambda: ran, timeout=5)
    assert ran[0] - sent < 0.3 + 0.25  # one wait timeout, plus scheduling slack


def test_idle_consumer_wakes_at_once_and_tokens_do_not_pile_up(redis_url: str) -> None:
    broker, _ = redis_broker(redis_url)
    assert isinstance(broker, BlockingRedisBroker)
    queue = unique("q")
    echo = _echo_actor(broker, queue)
    client = redis.Redis.from_url(redis_url)
    with running_worker(broker, worker_timeout=1000):
        echo.call(EchoParams(message="warm"), timeout=5)
        time.sleep(0.3)  # idle: blocked in BLPOP
        started = time.monotonic()
        assert echo.call(EchoParams(message="x"), timeout=5).message == "x"
        assert time.monotonic() - started < 0.5  # not a polling interval
        messages = [echo.send(EchoParams(message=str(i))) for i in range(200)]
        assert len(messages) == 200
        wait_until(lambda: client.hlen(f"{broker.namespace}:{queue}.msgs") == 0, timeout=10)
        assert client.llen(wake_key(broker.namespace, queue)) <= 64
    client.close()


def test_pipelined_reads_every_reply_and_survives_a_stale_connection(
    redis_url: str, second_redis_url: str
) -> None:
    from rpc_tasks.redis.connection import pipelined, same_redis

    client = redis.Redis.from_url(redis_url)
    key = unique("test:pipelined")
    assert pipelined(client, [("RPUSH", key, "a", "b"), ("LRANGE", key, 0, -1)]) == [2, [b"a", b"b"]]
    with pytest.raises(redis.ResponseError):
        pipelined(client, [("INCR", key), ("DEL", key)])  # INCR on a list: an error reply
    assert client.exists(key) == 0  # ...and the command after it still ran
    # The pooled connection killed on the server side: the next call still succeeds.
    client_id = pipelined(client, [("CLIENT", "ID")])[0]
    killer = redis.Redis.from_url(redis_url)
    assert killer.execute_command("CLIENT", "KILL", "ID", client_id)
    killer.close()
    assert pipelined(client, [("PING",)]) == [b"PONG"]
    assert same_redis(client, redis.Redis.from_url(redis_url))
    assert not same_redis(client, redis.Redis.from_url(second_redis_url))
    client.close()


class _EnqueueHooks(dramatiq.Middleware):
    def __init__(self) -> None:
        self.events: list[str] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.events.append(f"before:{message.options.get('redis_message_id') is not None}")

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.events.append("after")


def test_call_runs_enqueue_hooks_and_survives_a_lost_script_cache() -> None:
    """``.call()`` sends the enqueue script and the reply BLPOP together; enqueue hooks still run
    (after_enqueue once the enqueue is confirmed), and a server that lost its script cache
    (SCRIPT FLUSH, restart) is handled by loading the script again, without waiting out the
    timeout. A private redis-server, since SCRIPT FLUSH is server-wide."""
    with PrivateRedis() as server:
        url = server.url(db=1)
        broker, _ = redis_broker(url)
        hooks = _EnqueueHooks()
        broker.add_middleware(hooks)
        echo = _echo_actor(broker, unique("q"))
        client = redis.Redis.from_url(url)
        with running_worker(broker):
            assert echo.call(EchoParams(message="one"), timeout=5).message == "one"
            assert hooks.events == ["before:True", "after"]
            client.script_flush()
            started = time.monotonic()
            assert echo.call(EchoParams(message="two"), timeout=5).message == "two"
            assert time.monotonic() - started < 2
        assert hooks.events == ["before:True", "after", "before:True", "after"]
        client.close()


def test_pinned_connections_belong_to_their_own_pool(redis_url: str, second_redis_url: str) -> None:
    """A thread keeps one connection per pool; a pool that is gone does not hand its connection
    to a later pool (which could sit at the same address)."""
    import gc

    from rpc_tasks.redis.connection import pipelined

    other_url = second_redis_url
    other_db = int(other_url.rsplit("/", 1)[1])

    def db_of(client: redis.Redis) -> int:
        info = pipelined(client, [("CLIENT", "INFO")], pinned=True)[0]
        text = info.decode() if isinstance(info, bytes) else str(info)
        return int(text.split(" db=")[1].split()[0])

    base_db = int(redis_url.rsplit("/", 1)[1])
    for _ in range(20):
        a = redis.Redis.from_url(redis_url)
        b = redis.Redis.from_url(other_url)
        assert db_of(a) == base_db and db_of(b) == other_db
        a.close()
        b.close()
        del a, b
        gc.collect()


def test_worker_restarts_give_their_kept_connections_back(redis_url: str) -> None:
    """Consumer and worker threads keep a connection each; a stopped worker gives them back,
    so restarting workers in one process on a bounded pool never runs out of connections."""
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=8, timeout=2)
    broker = BlockingRedisBroker(client=redis.Redis(connection_pool=pool), namespace=unique("ns"))
    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:resp") + ":")
    setup_broker(broker, config=config, set_global=False)
    echo = _echo_actor(broker, unique("q"))
    for round_ in range(5):  # each run keeps 4 connections (2 consumers + 2 worker threads)
        with running_worker(broker, threads=2):
            assert echo.call(EchoParams(message=f"r{round_}"), timeout=5).message == f"r{round_}"
    probe = pool.get_connection()  # a connection is still free after all the runs
    pool.release(probe)
    pool.disconnect()


def test_socket_timeout_shorter_than_worker_timeout(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A broker whose sockets time out (``socket_timeout`` in the URL) long before
    ``worker_timeout``: the idle consumer's blocking read is waited for with its own timeout
    instead of failing every time."""
    # 0.1 s: shorter than Redis's own timer tick for blocking commands (1/hz = 100 ms)
    broker, _ = redis_broker(redis_url + "?socket_timeout=0.1")
    echo = _echo_actor(broker, unique("q"))
    with caplog.at_level("WARNING"), running_worker(broker, worker_timeout=1000):
        time.sleep(1.2)  # several idle waits
        assert echo.call(EchoParams(message="after idle"), timeout=5).message == "after idle"
    problems = [r for r in caplog.records if r.name.startswith("dramatiq") and r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


def test_call_many_after_a_lost_script_cache_runs_each_message_once() -> None:
    """``call_many`` enqueues in one pipeline; if the server lost its scripts (SCRIPT FLUSH,
    restart), the messages that did not go in are enqueued again, and none twice."""
    with PrivateRedis() as server:
        url = server.url(db=1)
        broker, _ = redis_broker(url)
        queue = unique("q")
        seen: list[str] = []

        @rpc_actor(broker=broker, queue_name=queue, actor_name="record")
        def record(params: EchoParams) -> EchoResult:
            seen.append(params.message)
            return EchoResult(message=params.message)

        client = redis.Redis.from_url(url)
        with running_worker(broker):
            assert record.call(EchoParams(message="warm"), timeout=5).message == "warm"
            client.script_flush()
            messages = [f"m{i}" for i in range(10)]
            results = record.call_many([EchoParams(message=m) for m in messages], timeout=5)
            assert [r.message for r in results] == messages
            # Every message enqueued so far (a duplicate too) has run once the queue is empty,
            # and a marker sent after them did run.
            record.send(EchoParams(message="marker"))
            wait_until(lambda: "marker" in seen, timeout=10)
            broker.join(queue, timeout=10_000)
        assert sorted(seen) == sorted(["warm", *messages, "marker"])
        client.close()


def test_call_with_a_tiny_timeout_still_runs_after_enqueue_hooks(redis_url: str) -> None:
    """A deadline that passes before Redis confirmed the enqueue still reads the confirmation:
    ``after_enqueue`` runs once for every message that went in."""
    from rpc_tasks import RPCTimeoutError

    broker, _ = redis_broker(redis_url)
    hooks = _EnqueueHooks()
    broker.add_middleware(hooks)
    echo = _echo_actor(broker, unique("q"))  # no worker: every call times out
    for _ in range(20):
        with pytest.raises(RPCTimeoutError):
            echo.call(EchoParams(message="x"), timeout=0.0001)
        with pytest.raises(RPCTimeoutError):
            echo.call(EchoParams(message="x"), timeout=0.05)  # enqueued, then timed out
    # A call already expired before its enqueue enqueues nothing and runs no hook.
    enqueued = broker.do_qsize(echo.queue_name)
    assert enqueued >= 20
    assert hooks.events == ["before:True", "after"] * enqueued


def test_fork_while_other_threads_keep_connections(redis_url: str) -> None:
    """A process forked while other threads keep connections (and one holds the pool's lock)
    returns from ``fork()`` in the child: the child never hands the parent's connections back."""
    import os
    import threading

    from rpc_tasks.redis.connection import pipelined

    pool = redis.ConnectionPool.from_url(redis_url)
    client = redis.Redis(connection_pool=pool)
    stop = threading.Event()
    ready = threading.Barrier(3)

    def keeper() -> None:
        pipelined(client, [("PING",)], pinned=True)
        ready.wait()
        stop.wait()

    def lock_holder() -> None:  # a thread inside the pool at the moment of the fork
        with pool._lock:
            ready.wait()
            stop.wait()

    threads = [threading.Thread(target=f, daemon=True) for f in (keeper, lock_holder)]
    for thread in threads:
        thread.start()
    ready.wait()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.02)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in fork()")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        pool.disconnect()


def test_call_and_call_many_over_resp3(redis_url: str) -> None:
    """``?protocol=3`` in the Redis URL (RESP3 replies): ``.call()`` and ``call_many`` work."""
    broker, _ = redis_broker(redis_url + "?protocol=3")
    echo = _echo_actor(broker, unique("q"))
    with running_worker(broker):
        assert echo.call(EchoParams(message="three"), timeout=5).message == "three"
        results = echo.call_many([EchoParams(message=m) for m in ("a", "b", "c")], timeout=5)
        assert [r.message for r in results] == ["a", "b", "c"]
