"""Unit tests of ReplyChannel (rpc_tasks.redis.replies) against fakeredis; no real Redis needed."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rpc_tasks.config import WebSocketRPCConfig
from rpc_tasks.exceptions import RPCConnectionError
from rpc_tasks.redis import connection as redis_connection
from rpc_tasks.redis.connection import make_redis
from rpc_tasks.redis.replies import ReplyChannel

PREFIX = "list:response:"


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def channel(client: fakeredis.FakeRedis) -> ReplyChannel:
    return ReplyChannel(client, prefix=PREFIX, ttl=60)


def _closed_port_client() -> redis.Redis:
    """A client for a port nobody listens on, with redis-py's reconnect retries switched off."""
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def _disconnected_fake() -> fakeredis.FakeRedis:
    server = fakeredis.FakeServer()
    server.connected = False  # fakeredis then raises redis.ConnectionError for every command
    return fakeredis.FakeRedis(server=server)


# -- keys --------------------------------------------------------------------------------------


def test_key_for_uses_prefix(channel: ReplyChannel) -> None:
    assert channel.key_for("abc-123") == "list:response:abc-123"
    assert ReplyChannel(fakeredis.FakeRedis(), prefix="p:").key_for("x") == "p:x"
    with pytest.raises(ValueError):
        channel.key_for("")
    with pytest.raises(ValueError):
        channel.key_for("has space")


def test_from_config_takes_prefix_ttl_and_limit(client: fakeredis.FakeRedis) -> None:
    config = WebSocketRPCConfig(response_key_prefix="app:resp:", response_key_ttl=17, max_payload_bytes=4096)
    channel = ReplyChannel.from_config(config, client)
    assert channel.client is client
    assert channel.prefix == "app:resp:"
    assert channel.ttl == 17
    assert channel.max_bytes == 4096
    assert channel.key_for("c") == "app:resp:c"


# -- push --------------------------------------------------------------------------------------


def test_push_stores_payload_with_ttl(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    key = channel.key_for("c1")
    channel.push(key, b'{"success":true}')
    assert client.lrange(key, 0, -1) == [b'{"success":true}']
    ttl = client.ttl(key)
    assert 0 < ttl <= 60


def test_push_uses_configured_ttl(client: fakeredis.FakeRedis) -> None:
    channel = ReplyChannel(client, prefix=PREFIX, ttl=5)
    key = channel.key_for("c2")
    channel.push(key, b"x")
    assert 0 < client.ttl(key) <= 5
    assert client.pttl(key) > 0


def test_push_is_one_atomic_script(
    channel: ReplyChannel, client: fakeredis.FakeRedis, monkeypatch: Any
) -> None:
    """LPUSH and EXPIRE run together in one script (EXPIRE only after a successful LPUSH),
    never as separate commands."""
    pipelines: list[bool] = []
    real_pipeline = client.pipeline

    def spy_pipeline(transaction: bool = True, shard_hint: Any = None) -> Any:
        pipelines.append(transaction)
        return real_pipeline(transaction=transaction, shard_hint=shard_hint)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("push must not send LPUSH/EXPIRE outside a transaction")

    monkeypatch.setattr(client, "pipeline", spy_pipeline)
    for name in ("lpush", "rpush", "expire", "pexpire", "set"):
        monkeypatch.setattr(client, name, forbidden)
    key = channel.key_for("c3")
    channel.push(key, b"payload")
    assert pipelines == []
    monkeypatch.undo()
    assert client.lrange(key, 0, -1) == [b"payload"]
    assert client.ttl(key) > 0


def test_push_twice_keeps_a_ttl(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    key = channel.key_for("dup")
    channel.push(key, b"a")
    channel.push(key, b"b")
    assert client.llen(key) == 2
    assert 0 < client.ttl(key) <= 60


# -- wait --------------------------------------------------------------------------------------


def test_wait_returns_payload_and_leaves_no_key(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    key = channel.key_for("c4")
    channel.push(key, b'{"result":1}')
    started = time.monotonic()
    assert channel.wait(key, 2.0) == b'{"result":1}'
    assert time.monotonic() - started < 0.5  # returns as soon as the reply is there
    assert client.exists(key) == 0


def test_wait_removes_duplicate_replies(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    key = channel.key_for("c5")
    channel.push(key, b"first")
    channel.push(key, b"second")  # e.g. a redelivered message replied twice
    assert channel.wait(key, 1.0) in (b"first", b"second")
    assert client.exists(key) == 0


def test_wait_only_reads_its_own_key(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    channel.push(channel.key_for("other"), b"not mine")
    assert channel.wait(channel.key_for("mine"), 0.05) is None
    assert client.lrange(channel.key_for("other"), 0, -1) == [b"not mine"]


def test_wait_returns_bytes_with_decoding_client() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    channel = ReplyChannel(client, prefix=PREFIX)
    key = channel.key_for("c6")
    channel.push(key, '{"text":"é"}'.encode())
    assert channel.wait(key, 1.0) == '{"text":"é"}'.encode()


def test_wait_on_empty_key_times_out(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    timeout = 0.1
    key = channel.key_for("never")
    started = time.monotonic()
    assert channel.wait(key, timeout) is None
    elapsed = time.monotonic() - started
    # fakeredis runs BLPOP synchronously with the server-side timeout, which includes the
    # channel's slack; against real Redis the client-side deadline applies.
    slack = getattr(redis_connection, "SERVER_SLACK_SECONDS", 0.0)
    assert timeout * 0.9 <= elapsed < timeout + slack + 0.3
    assert client.exists(key) == 0


def test_channel_usable_after_timeout(channel: ReplyChannel) -> None:
    key = channel.key_for("later")
    assert channel.wait(key, 0.01) is None
    channel.push(key, b"late")
    assert channel.wait(key, 1.0) == b"late"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_client", [_closed_port_client, _disconnected_fake], ids=["closed-port", "fake"]
)
def test_redis_errors_become_connection_errors(make_client: Any) -> None:
    channel = ReplyChannel(make_client(), prefix=PREFIX)
    key = channel.key_for("c7")
    started = time.monotonic()
    with pytest.raises(RPCConnectionError) as push_info:
        channel.push(key, b"x")
    assert isinstance(push_info.value.__cause__, redis.RedisError)
    with pytest.raises(RPCConnectionError):
        channel.wait(key, 0.1)
    assert channel.ping() is False
    channel.discard(key)  # best effort: never raises
    assert time.monotonic() - started < 1.0


def test_ping_true_when_redis_answers(channel: ReplyChannel) -> None:
    assert channel.ping() is True


def test_discard_deletes_key(channel: ReplyChannel, client: fakeredis.FakeRedis) -> None:
    key = channel.key_for("gone")
    channel.push(key, b"x")
    channel.discard(key)
    assert client.exists(key) == 0


# -- make_redis --------------------------------------------------------------------------------


def test_make_redis_uses_a_blocking_pool_without_connecting() -> None:
    client = make_redis("redis://user:pw@localhost:6379/3", max_connections=7, pool_timeout=2.0)
    pool = client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert pool.max_connections == 7
    assert pool.timeout == 2.0
    assert pool.connection_kwargs["db"] == 3


def test_make_redis_bad_url_is_connection_error_without_password() -> None:
    with pytest.raises(RPCConnectionError) as info:
        make_redis("http://user:hunter2-s3cret@localhost:6379/0")
    assert "hunter2-s3cret" not in str(info.value)


def test_same_redis_only_for_a_known_server_and_database() -> None:
    """Used to decide whether a reply may share the broker's scripts: only clients whose
    settings name the same server, database and user count as the same Redis."""
    from redis.sentinel import Sentinel, SentinelConnectionPool

    from rpc_tasks.redis.connection import same_redis

    a = redis.Redis.from_url("redis://127.0.0.1:6379/3")
    assert same_redis(a, a)
    assert same_redis(a, redis.Redis.from_url("redis://127.0.0.1:6379/3"))
    assert same_redis(a, make_redis("redis://127.0.0.1:6379/3"))  # blocking pool, same server
    assert not same_redis(a, redis.Redis.from_url("redis://127.0.0.1:6379/4"))
    assert not same_redis(a, redis.Redis.from_url("redis://127.0.0.1:6380/3"))
    assert not same_redis(a, redis.Redis.from_url("redis://other:x@127.0.0.1:6379/3"))
    assert not same_redis(a, redis.Redis.from_url("rediss://127.0.0.1:6379/3"))
    assert not same_redis(a, redis.Redis.from_url("unix:///tmp/redis.sock?db=3"))
    # Sentinel pools find their server at run time: two services are never "the same".
    sentinel = Sentinel([("127.0.0.1", 26379)])
    one = redis.Redis(connection_pool=SentinelConnectionPool("one", sentinel, db=3))
    two = redis.Redis(connection_pool=SentinelConnectionPool("two", sentinel, db=3))
    assert not same_redis(one, two)
    assert same_redis(one, redis.Redis(connection_pool=one.connection_pool))


def test_fast_packer_sends_exactly_what_redis_py_would() -> None:
    """The hot paths pack commands themselves; the bytes must be redis-py's, for every argument
    type they use (including big and binary values sent as separate buffers)."""
    from rpc_tasks.redis.connection import pack as _pack

    conn = redis.Connection()  # packing needs no server
    cases: list[list[tuple[Any, ...]]] = [
        [("BLPOP", "ns:q.wake", 1.5), ("EVALSHA", "a" * 40, 1, "ns", "fetch", 1795734854361, "q", 0, -4)],
        [("SET", b"x" * 20_000, "é" * 10_000), ("GET", "k")],
        [("LPUSH", "k", b"\x00\r\n" * 9_000, 3, 0.1, "\u2603")],
        [("PING",)],
        [("CONFIG GET", "maxmemory")],  # a two-word name: redis-py splits it
    ]
    for commands in cases:
        assert b"".join(_pack(conn, commands)) == b"".join(conn.pack_commands(commands))
    # anything else goes through redis-py (which knows how to refuse it)
    with pytest.raises(redis.DataError):
        _pack(conn, [("SET", "k", None)])
