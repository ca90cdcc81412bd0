"""Everything but Dramatiq's broker on a private 3-master Redis Cluster (``redis+cluster://``):
reply lists (sync and async), Streams client and server, rate limits and cooldowns, the
WebSocket server's presence, rooms and fan-out, and a slot moved (``ASK`` then ``MOVED``) while
calls are in flight."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel
from redis.cluster import RedisCluster

from rpc_tasks import RPCServer, WebSocketRPCClient, WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.connection import make_redis, pipelined
from rpc_tasks.redis.ratestore import RateStore, cooldown_key, limiter_keys
from rpc_tasks.redis.replies import ReplyChannel
from rpc_tasks.websocket.store import AsyncWSStore

from .support import delete_rabbit_queues, running_worker, unique, wait_until
from .topologies import migrate_slot, private_cluster

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[int]]:
    with private_cluster(3) as ports:
        yield ports


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports[:2]) + "/"


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


def test_cluster_url_builds_a_cluster_client_that_sees_every_master(cluster: list[int]) -> None:
    client = make_redis(cluster_url(cluster))
    assert isinstance(client, RedisCluster)
    assert sorted(node.port for node in client.get_primaries()) == sorted(cluster)
    client.close()


def test_reply_channel_pushes_and_pops_on_every_slot_owner(cluster: list[int]) -> None:
    channel = ReplyChannel(make_redis(cluster_url(cluster)), prefix=unique("resp") + ":")
    keys = [channel.key_for(unique("c")) for _ in range(30)]
    owners = {channel.client.get_node_from_key(key).port for key in keys}  # type: ignore[attr-defined]
    assert len(owners) == 3  # the keys spread over the three masters
    for key in keys:
        channel.push(key, key.encode())
    assert [channel.wait(key, 2.0) for key in keys] == [key.encode() for key in keys]
    assert channel.client.exists(*keys) == 0  # DEL went with each BLPOP
    started = time.monotonic()
    assert channel.wait(channel.key_for(unique("none")), 0.2) is None
    assert time.monotonic() - started < 2.0


def test_raw_pipelines_route_to_the_key_owner(cluster: list[int]) -> None:
    client = make_redis(cluster_url(cluster))
    for i in range(20):
        key = unique(f"k{i}")
        assert pipelined(client, [("SET", key, "v", "EX", 30), ("GET", key)]) == [b"OK", b"v"]


def cooldown_keys_on_every_master(client: Any, per_master: int) -> list[str]:
    """``per_master`` cooldown keys owned by each master (by the client's slot map): random
    keys could all miss one of the three (10 of them do so 5 % of the time)."""
    by_port: dict[int, list[str]] = {node.port: [] for node in client.get_primaries()}
    for _ in range(10_000):
        key = cooldown_key(unique("tenant"))
        owned = by_port[client.get_node_from_key(key).port]
        if len(owned) < per_master:
            owned.append(key)
        if all(len(keys) == per_master for keys in by_port.values()):
            return [key for keys in by_port.values() for key in keys]
    raise AssertionError(f"no {per_master} keys per master in 10000 tries: {by_port}")


def scans_served(ports: list[int]) -> int:
    """``SCAN`` commands the cluster's masters have served so far."""
    total = 0
    for port in ports:
        node = redis.Redis(port=port)
        total += int(node.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
        node.close()
    return total


def test_rate_limits_and_cooldowns_touch_one_slot_and_never_scan(cluster: list[int]) -> None:
    client = make_redis(cluster_url(cluster))
    scans_before = scans_served(cluster)
    store = RateStore(client, events_channel=unique("rpc_tasks:rate:test") + ":events")
    tat, reserve = limiter_keys("crm-api")
    assert client.keyslot(tat) == client.keyslot(reserve)  # type: ignore[attr-defined]
    first = store.acquire(limiter_keys(unique("api")), 1000.0, False)
    assert first == (0, False)
    # A cooldown opened before the view connected is found (PTTL on first use, no SCAN).
    early = cooldown_key(unique("tenant"))
    store.open_cooldown(early, 5000)
    assert store.cooldown_left_fast(cooldown_key(unique("warm-up"))) == 0
    wait_until(store._view_ready.is_set, 10)
    assert 0 < store.cooldown_left_fast(early) <= 5000
    # One opened later is announced over Pub/Sub (cluster-wide) to the local view.
    # Keys on every master: an announcement reaches the view whichever node published it.
    later = cooldown_keys_on_every_master(client, 3)
    assert {client.get_node_from_key(key).port for key in later} == set(cluster)  # type: ignore[attr-defined]
    for key in later:
        store.open_cooldown(key, 5000)
    wait_until(lambda: all(key in store._view for key in later), 10)
    assert all(0 < store.cooldown_left_fast(key) <= 5000 for key in later)
    assert scans_served(cluster) == scans_before, "the rate store must never SCAN (one node's keys only)"


def streams_config(cluster: list[int], tag: str) -> WebSocketRPCConfig:
    """Streams on a cluster: the request stream, its dead-letter stream and the reply keys
    share one hash tag, so the server's ack-and-reply script touches one slot."""
    return WebSocketRPCConfig(
        redis_url=cluster_url(cluster),
        request_stream=f"stream:requests{{{tag}}}",
        response_key_prefix=f"list:response:{{{tag}}}:",
        consumer_group=unique("group"),
    )


def make_server(config: WebSocketRPCConfig) -> RPCServer:
    server = RPCServer(config, concurrency=4, claim_interval=0.5)

    @server.method("add")
    def add(params: Add) -> Sum:
        return Sum(total=params.a + params.b)

    return server


def test_streams_client_and_server_on_a_cluster(cluster: list[int]) -> None:
    config = streams_config(cluster, unique("rpc"))
    server = make_server(config)
    server.start()
    client = WebSocketRPCClient(config)
    try:
        assert client.health_check(timeout=10)
        for i in range(20):
            assert client.call("add", Add(a=i, b=1), result_model=Sum, timeout=10).total == i + 1
        client.fire_and_forget("add", Add(a=1, b=1))
    finally:
        client.close()
        assert server.stop(10)


def test_a_slot_moves_while_calls_are_in_flight(cluster: list[int]) -> None:
    """The slot of the Streams tag (request stream, consumer group, reply keys) is migrated to
    another master while four threads keep calling: every call succeeds (``ASK`` is waited out,
    ``MOVED`` refreshes the slot map), none is lost."""
    tag = unique("moving")
    config = streams_config(cluster, tag)
    server = make_server(config)
    server.start()
    client = WebSocketRPCClient(config)
    errors: list[BaseException] = []
    done: list[int] = []
    stop = threading.Event()

    def caller(base: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                total = client.call("add", Add(a=base, b=i), result_model=Sum, timeout=20).total
                assert total == base + i
                done.append(total)
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    try:
        assert client.health_check(timeout=10)
        threads = [threading.Thread(target=caller, args=(1000 * n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(done) >= 20, 30)
        slot = redis.cluster.key_slot(f"{{{tag}}}".encode())
        before = len(done)
        source, target = migrate_slot(cluster, slot)
        wait_until(lambda: len(done) >= before + 40 or errors, 60)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        owner = RedisCluster(host="127.0.0.1", port=cluster[0])
        assert owner.get_node_from_key(config.request_stream).port == target != source
        owner.close()
        print(f"\nslot {slot} moved {source} -> {target}: {len(done)} calls, {len(done) - before} after")
    finally:
        stop.set()
        client.close()
        assert server.stop(10)


def test_dramatiq_on_rabbitmq_with_replies_and_rate_limits_on_the_cluster(
    cluster: list[int], amqp_url: str
) -> None:
    """The recommended large deployment in small: messages on RabbitMQ, replies and the
    fleet-wide rate limit on the cluster."""
    pytest.importorskip("pika")
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    config = WebSocketRPCConfig(redis_url=cluster_url(cluster), response_key_prefix=unique("rmq:resp") + ":")
    try:
        broker = RabbitmqBroker(url=amqp_url)
    except Exception as exc:
        pytest.skip(f"RabbitMQ unavailable: {exc}")
    setup_broker(broker, config=config, set_global=False)
    queue = unique("scale")

    @rpc_actor(broker=broker, queue_name=queue, rate_limit="200/s", max_retries=0)
    def add(params: Add) -> Sum:
        return Sum(total=params.a + params.b)

    try:
        with running_worker(broker, threads=4):
            assert [add.call(Add(a=i, b=2), timeout=20).total for i in range(10)] == [
                i + 2 for i in range(10)
            ]
            assert [r.total for r in add.call_many([Add(a=i, b=0) for i in range(20)], timeout=30)] == list(
                range(20)
            )
    finally:
        delete_rabbit_queues(broker, queue)
        broker.close()


def test_websocket_store_presence_rooms_fanout_and_replies_on_a_cluster(cluster: list[int]) -> None:
    async def scenario() -> dict[str, Any]:
        store = AsyncWSStore.from_config(WebSocketRPCConfig(redis_url=cluster_url(cluster)))
        user = unique("user")
        room = unique("room")
        out: dict[str, Any] = {}
        await store.ready()
        pubsub = store.client.pubsub()
        channel = unique("fanout")
        await pubsub.subscribe(channel)
        try:
            for n in range(3):
                await store.register(unique(f"conn{n}"), user, b'{"n": %d}' % n)
            out["presence"] = sorted(await store.user_connections(user))
            out["joined"] = [await store.room_join(room, unique("m")) for _ in range(3)]
            out["members"] = len(await store.room_members(room))
            await asyncio.sleep(0.2)
            out["receivers"] = await store.publish(channel, b"hello")
            got = None
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    got = message["data"]
            out["fanout"] = got
            key = unique("ack")
            await store.ack(key, 2)
            out["acks"] = await store.collect_acks(key, 1, 5)
            reply = unique("list:response:")
            await store.client.lpush(reply, b"r")
            out["reply"] = await store.wait_reply(reply, 5)
            out["no_reply"] = await store.wait_reply(unique("list:response:"), 0.2)
        finally:
            await pubsub.aclose()
            await store.client.aclose()
        return out

    out = asyncio.run(scenario())
    assert out["presence"] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert out["joined"] == [1, 2, 3] and out["members"] == 3
    assert out["receivers"] >= 1 and out["fanout"] == b"hello"
    assert out["acks"] == [2]
    assert out["reply"] == b"r" and out["no_reply"] is None


def test_the_scale_out_example_runs(amqp_url: str) -> None:
    """``examples/scale_out/run.py``: its own cluster, two workers on RabbitMQ, two WebSocket
    instances and the smoke workload, end to end."""
    pytest.importorskip("websockets")
    pytest.importorskip("pika")
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "examples.scale_out.run"], env=env, cwd=ROOT, capture_output=True, timeout=300
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-3000:]
    assert "2 worker processes answered" in out or "1 worker processes answered" in out
    assert "got 5 of 5 notifications" in out
