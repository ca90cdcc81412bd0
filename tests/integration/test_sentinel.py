"""Sentinel failover under load (``redis+sentinel://``): a private master, a replica and three
sentinels; the master is killed while ``.call()``s, ``.send()``s and Streams calls go on. Work
continues on the promoted replica, the errors seen during the switch are rpc-tasks errors (never a
raw redis-py exception), no ``.send()`` acknowledged before the failover is lost (the broker
``WAIT``s for the replica), and the time to recover is printed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from rpc_tasks import (
    RPCConnectionError,
    RPCException,
    RPCServer,
    RPCTimeoutError,
    WebSocketRPCClient,
    WebSocketRPCConfig,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.contrib.django import dramatiq_broker_settings
from rpc_tasks.middleware import RPCReplies
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.redis.connection import make_redis
from rpc_tasks.websocket.store import AsyncWSStore

from .support import running_worker, unique, wait_until
from .topologies import SentinelGroup

pytestmark = pytest.mark.redis


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    # Two replicas: after the failover one is left to confirm writes (wait_replicas=1).
    with SentinelGroup(down_after_ms=1000, failover_timeout_ms=3000, replicas=2) as g:
        yield g


def test_sentinel_url_shares_one_master_client_between_broker_and_replies(group: SentinelGroup) -> None:
    url = group.url()
    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("resp") + ":")
    broker = setup_broker(config=config, broker_url=url + "&wait_replicas=1", set_global=False)
    assert isinstance(broker, BlockingRedisBroker) and broker.wait_replicas == 1
    replies = next(m for m in broker.middleware if isinstance(m, RPCReplies))
    assert replies.channel.client is broker.client  # so the reply goes out with the ack
    assert broker._shares_redis(replies.channel.client)
    assert make_redis(url).connection_pool.get_master_address()[1] == group.master.port  # type: ignore[attr-defined]
    # django-dramatiq builds the broker from settings: the same shared client.
    settings = dramatiq_broker_settings(url)
    django_broker = BlockingRedisBroker(**settings["OPTIONS"])
    assert django_broker.client is broker.client and django_broker.wait_replicas == 0


class Load:
    """Three kinds of traffic in threads, each recording successes (with their time) and errors."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.ok: dict[str, list[float]] = {"call": [], "send": [], "streams": []}
        self.errors: list[tuple[str, float, BaseException]] = []
        self.sent: set[int] = set()  # .send()s acknowledged (no exception)
        self.threads: list[threading.Thread] = []

    def report(self, since: float) -> str:
        ok = {kind: sum(t > since for t in v) for kind, v in self.ok.items()}
        last = {kind: repr(exc)[:200] for kind, _, exc in self.errors}
        return f"ok since {ok}; last errors {last}"

    def recovery(self, kind: str, killed_at: float) -> float:
        """Seconds from the kill to the first success after this kind's first failure (an
        operation that was already under way when the master died may still succeed)."""
        failed = [t for k, t, _ in self.errors if k == kind and t > killed_at]
        since = min(failed) if failed else killed_at
        return min(t for t in self.ok[kind] if t > since) - killed_at

    def run(self, kind: str, one: Callable[[int], Any]) -> None:
        def loop() -> None:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    one(i)
                    self.ok[kind].append(time.monotonic())
                except BaseException as exc:
                    self.errors.append((kind, time.monotonic(), exc))
                    time.sleep(0.05)
                time.sleep(0.005)

        thread = threading.Thread(target=loop, name=f"load-{kind}", daemon=True)
        self.threads.append(thread)
        thread.start()


def test_failover_under_calls_sends_and_streams(group: SentinelGroup) -> None:
    url = group.url()
    config = WebSocketRPCConfig(
        redis_url=url,
        response_key_prefix=unique("resp") + ":",
        request_stream=unique("stream"),
        consumer_group=unique("group"),
    )
    broker = setup_broker(config=config, broker_url=url + "&wait_replicas=1", set_global=False)
    queue = unique("failover")
    seen: set[int] = set()

    @rpc_actor(broker=broker, queue_name=queue, max_retries=3, min_backoff=50, max_backoff=200)
    def add(params: Add) -> Sum:
        if params.b < 0:
            seen.add(params.a)
        return Sum(total=params.a + params.b)

    server = RPCServer(config, concurrency=4, claim_interval=0.5)

    @server.method("add")
    def streams_add(params: Add) -> Sum:
        return Sum(total=params.a + params.b)

    client = WebSocketRPCClient(config)
    load = Load()
    killed_at = 0.0
    old_master = group.master.port

    def send(i: int) -> None:
        add.send(Add(a=i, b=-1))
        load.sent.add(i)

    try:
        server.start()
        with running_worker(broker, threads=4, worker_timeout=100):
            assert add.call(Add(a=1, b=1), timeout=10).total == 2
            assert client.call("add", Add(a=1, b=1), result_model=Sum, timeout=10).total == 2
            load.run("call", lambda i: add.call(Add(a=i, b=1), timeout=5))
            load.run("send", send)
            load.run("streams", lambda i: client.call("add", Add(a=i, b=1), result_model=Sum, timeout=5))
            wait_until(lambda: all(len(v) >= 10 for v in load.ok.values()), 30)
            os.kill(group.master.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            killed_at = time.monotonic()
            # Work continues: every kind succeeds again after the kill (bounded wait).
            try:
                wait_until(lambda: all(any(t > killed_at for t in v) for v in load.ok.values()), 60, 0.05)
            except AssertionError:
                raise AssertionError(f"not recovered: {load.report(killed_at)}") from None
            after = time.monotonic()
            wait_until(lambda: all(sum(t > after for t in v) >= 10 for v in load.ok.values()), 30)
            recovered = {kind: load.recovery(kind, killed_at) for kind in load.ok}
            load.stop.set()
            for thread in load.threads:
                thread.join(20)
            # Every acknowledged .send() ran (on the promoted replica, since WAIT confirmed it).
            wait_until(lambda: load.sent <= seen, 60)
    finally:
        load.stop.set()
        client.close()
        server.stop(10)
        try:
            broker.close()
        except Exception:
            pass
    assert group.master_port() != old_master  # a failover happened
    raw = [exc for _, _, exc in load.errors if not isinstance(exc, RPCException)]
    assert raw == [], f"raw exceptions leaked: {raw[:3]!r}"
    kinds = {type(exc).__name__ for _, _, exc in load.errors}
    assert kinds <= {RPCConnectionError.__name__, RPCTimeoutError.__name__}, kinds
    counts = {kind: len(v) for kind, v in load.ok.items()}
    print(
        "\nSentinel failover: recovered after "
        + ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in recovered.items())
        + f" (down-after {group.down_after_ms} ms); ok {counts}; errors during the switch "
        + f"{len(load.errors)} ({', '.join(sorted(kinds)) or 'none'}); .send()s acknowledged "
        + f"{len(load.sent)}, all ran"
    )


def test_wait_replicas_cost(group: SentinelGroup) -> None:
    """Not an assertion on speed: prints what ``wait_replicas=1`` costs a ``.send()`` here."""
    url = group.url()
    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("resp") + ":")
    senders = {}
    for replicas in (0, 1):
        suffix = f"&wait_replicas={replicas}" if replicas else ""
        broker = setup_broker(config=config, broker_url=url + suffix, set_global=False)

        @rpc_actor(broker=broker, queue_name=unique("cost"), actor_name=unique("cost"))
        def noop(params: Add) -> None:
            return None

        senders[replicas] = noop
    figures: dict[int, float] = {0: float("inf"), 1: float("inf")}
    for _ in range(3):  # alternate, keep the best of three rounds of 300 sends each
        for replicas, actor in senders.items():
            started = time.perf_counter()
            for _ in range(300):
                actor.send(Add(a=1, b=1))
            figures[replicas] = min(figures[replicas], (time.perf_counter() - started) / 300 * 1e6)
    print(f"\n.send() on Sentinel: {figures[0]:.0f} us; with wait_replicas=1: {figures[1]:.0f} us")
    assert all(value > 0 for value in figures.values())


def test_websocket_store_on_the_sentinel_master(group: SentinelGroup) -> None:
    """The WebSocket server's async store (``redis.asyncio``) on a Sentinel URL."""

    async def scenario() -> tuple[list[bytes], bytes | None, int]:
        store = AsyncWSStore.from_config(WebSocketRPCConfig(redis_url=group.url()))
        try:
            user = unique("user")
            await store.register(unique("conn"), user, b"{}")
            presence = await store.user_connections(user)
            key = unique("list:response:")
            await store.client.lpush(key, b"r")
            reply = await store.wait_reply(key, 5)
            port = (await store.client.connection_pool.get_master_address())[1]
        finally:
            await store.client.aclose()
        return presence, reply, int(port)

    presence, reply, port = asyncio.run(scenario())
    assert presence == [b"{}"] and reply == b"r" and port == group.master.port
