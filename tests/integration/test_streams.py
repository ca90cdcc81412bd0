"""WebSocketRPCClient <-> RPCServer over real Redis Streams."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel, ValidationError

from rpc_tasks import (
    RateLimitError,
    RPCConnectionError,
    RPCErrorCode,
    RPCRemoteError,
    RPCServer,
    RPCTimeoutError,
    WebSocketRPCClient,
    WebSocketRPCConfig,
    get_rpc_client,
    protocol,
)
from rpc_tasks.redis.replies import ReplyChannel
from rpc_tasks.streams.io import StreamIO

from .support import reply_keys, unique, wait_until

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


class Other(BaseModel):
    something_else: str


@pytest.fixture(params=["readers", "one-reader"])
def config(redis_url: str, request: pytest.FixtureRequest) -> WebSocketRPCConfig:
    """Every server test runs in both serving modes: a reader thread per handler (the pool has
    room for a connection per thread) and one reader handing entries to handler threads (a
    pool too small for that: 12 < 2 x 8 + 4)."""
    return WebSocketRPCConfig(
        redis_url=redis_url,
        request_stream=unique("stream"),
        response_key_prefix=unique("resp") + ":",
        consumer_group=unique("group"),
        redis_max_connections=50 if request.param == "readers" else 12,
    )


def make_server(config: WebSocketRPCConfig, **kwargs: Any) -> RPCServer:
    server = RPCServer(config, **kwargs)
    calls: list[Any] = []
    server.calls = calls  # type: ignore[attr-defined]

    @server.method("add")
    def add(params: Add) -> Sum:
        calls.append(params)
        return Sum(total=params.a + params.b)

    @server.method("limited")
    def limited(params: Add) -> Sum:
        raise RPCRemoteError(RateLimitError(message="slow down", retry_after=2.5, details={"bucket": "x"}))

    @server.method("crash")
    def crash(params: Add) -> Sum:
        raise ZeroDivisionError("division by zero")

    @server.method("exits")
    def exits(params: Add) -> Sum:
        raise SystemExit(3)

    gauge = {"active": 0, "peak": 0}
    gauge_lock = threading.Lock()
    server.gauge = gauge  # type: ignore[attr-defined]

    @server.method("slow")
    def slow(params: Add) -> Sum:
        with gauge_lock:
            gauge["active"] += 1
            gauge["peak"] = max(gauge["peak"], gauge["active"])
        time.sleep(params.a / 1000)
        with gauge_lock:
            gauge["active"] -= 1
        return Sum(total=params.a)

    return server


@pytest.fixture
def server(config: WebSocketRPCConfig) -> Iterator[RPCServer]:
    srv = make_server(config, concurrency=16, claim_interval=0.5)
    srv.start()
    yield srv
    assert srv.stop(10)


@pytest.fixture
def client(config: WebSocketRPCConfig) -> Iterator[WebSocketRPCClient]:
    c = WebSocketRPCClient(config)
    yield c
    c.close()


def test_round_trip_typed(server: RPCServer, client: WebSocketRPCClient, config: WebSocketRPCConfig) -> None:
    result = client.call("add", Add(a=2, b=40), Sum, timeout=5)
    assert result == Sum(total=42)
    assert reply_keys(config.redis_url, config.response_key_prefix) == []
    pending, _ = StreamIO(client.redis).backlog(config.request_stream, config.consumer_group)
    assert pending == 0, "acked"


def test_result_not_matching_result_model_is_validation_error(
    server: RPCServer, client: WebSocketRPCClient
) -> None:
    with pytest.raises(ValidationError):
        client.call("add", Add(a=1, b=1), Other, timeout=5)


def test_fire_and_forget_runs_and_creates_no_reply_key(
    server: RPCServer, client: WebSocketRPCClient, config: WebSocketRPCConfig
) -> None:
    io = StreamIO(client.redis)
    # Positive control: a request with a timeout whose reply nobody reads leaves its reply key,
    # so the check below would see a reply if the fire-and-forget request got one.
    unread = ReplyChannel(client.redis, prefix=config.response_key_prefix).key_for("unread-1")
    io.add_request(
        config.request_stream,
        protocol.encode_request("add", Add(a=0, b=0), reply_to=unread, timeout=5, correlation_id="unread-1"),
        1000,
    )
    entry_id = client.fire_and_forget("add", Add(a=1, b=2))
    assert isinstance(entry_id, str) and "-" in entry_id
    wait_until(lambda: len(server.calls) == 2)  # type: ignore[attr-defined]
    # Replies go out with the XACK (one MULTI): once nothing is pending, every reply is written.
    wait_until(lambda: io.backlog(config.request_stream, config.consumer_group)[0] == 0, timeout=10)
    assert reply_keys(config.redis_url, config.response_key_prefix) == [unread.encode()]


def test_unknown_method_and_invalid_params(server: RPCServer, client: WebSocketRPCClient) -> None:
    with pytest.raises(RPCRemoteError) as info:
        client.call("no.such.method", Add(a=1, b=1), Sum, timeout=5)
    assert info.value.error.code is RPCErrorCode.METHOD_NOT_FOUND
    with pytest.raises(RPCRemoteError) as info:
        client.call("add", Other(something_else="x"), Sum, timeout=5)
    assert info.value.error.code is RPCErrorCode.VALIDATION_ERROR
    locs = [e["loc"] for e in info.value.error.details["errors"]]
    assert ["a"] in locs and ["b"] in locs
    with pytest.raises(ValueError):
        client.call("bad method!", Add(a=1, b=1), Sum, timeout=5)


def test_remote_error_with_retry_after_through_the_extension(
    server: RPCServer, client: WebSocketRPCClient
) -> None:
    with pytest.raises(RPCRemoteError) as info:
        client.call("limited", Add(a=1, b=1), Sum, timeout=5)
    assert info.value.error.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert info.value.retry_after == 2.5
    assert info.value.is_retryable
    assert info.value.error.details == {"bucket": "x"}
    with pytest.raises(RPCRemoteError) as info:
        client.call("crash", Add(a=1, b=1), Sum, timeout=5)
    assert info.value.error.code is RPCErrorCode.INTERNAL_ERROR
    assert "ZeroDivisionError" in info.value.error.message


def test_plain_peers_without_the_extension(server: RPCServer, config: WebSocketRPCConfig) -> None:
    # 1. A client that does not announce the extension gets exactly the six plain keys.
    io = StreamIO(redis.Redis.from_url(config.redis_url))
    replies = ReplyChannel(io.client, prefix=config.response_key_prefix)
    reply_to = replies.key_for("plain-1")
    io.add_request(
        config.request_stream,
        protocol.encode_request(
            "limited", Add(a=1, b=1), reply_to=reply_to, timeout=5, correlation_id="plain-1"
        ),
        1000,
    )
    raw = replies.wait(reply_to, 5)
    assert raw is not None
    assert set(json.loads(raw)) == {"correlation_id", "timestamp", "success", "result", "error", "error_code"}
    # 2. Our client understands such a response: retry_after None, retryable from the code.
    err = protocol.decode_response(raw).error
    assert err is not None and err.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert err.retry_after is None and err.retryable is True


def test_client_against_an_old_server_that_sends_plain_responses(config: WebSocketRPCConfig) -> None:
    """A hand-written 'old' server: reads the group, answers without the extension."""
    client = WebSocketRPCClient(config)
    io = StreamIO(client.redis)
    io.ensure_group(config.request_stream, config.consumer_group)

    seen: list[dict[str, Any]] = []
    failures: list[BaseException] = []

    def old_server() -> None:
        try:
            entries: list[Any] = []
            deadline = time.monotonic() + 10
            while not entries and time.monotonic() < deadline:
                entries = io.read(config.request_stream, config.consumer_group, "old", 1, 100)
            if not entries:
                return
            entry_id, fields = entries[0]
            req = json.loads(fields["payload"])
            seen.append(req)
            plain = {
                "correlation_id": req["correlation_id"],
                "timestamp": "2026-01-01T00:00:00Z",
                "success": False,
                "result": None,
                "error": "user 42 is offline",
                "error_code": "user_not_connected",
            }
            io.finish(
                config.request_stream,
                config.consumer_group,
                entry_id,
                req["reply_to"],
                json.dumps(plain).encode(),
            )
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=old_server)
    thread.start()
    with pytest.raises(RPCRemoteError) as info:
        client.call("send_notification", Add(a=1, b=1), Sum, timeout=5)
    thread.join(15)
    assert not thread.is_alive() and failures == []
    assert len(seen) == 1
    assert set(seen[0]) >= {"correlation_id", "timestamp", "method", "reply_to", "timeout", "params"}
    assert info.value.error.code is RPCErrorCode.USER_NOT_CONNECTED
    assert info.value.retry_after is None and info.value.is_retryable is False


def test_timeout_precision_and_health_check(config: WebSocketRPCConfig, client: WebSocketRPCClient) -> None:
    # no server at all
    for timeout in (0.05, 0.25):
        started = time.perf_counter()
        with pytest.raises(RPCTimeoutError) as info:
            client.call("add", Add(a=1, b=1), Sum, timeout=timeout)
        elapsed = time.perf_counter() - started
        assert timeout <= elapsed < timeout + 0.05, elapsed
        assert info.value.method == "add" and info.value.timeout_seconds == timeout
    started = time.perf_counter()
    assert client.health_check(timeout=0.5) is False
    assert time.perf_counter() - started < 0.7
    srv = make_server(config)
    srv.start()
    try:
        assert client.health_check(timeout=5) is True
    finally:
        srv.stop(10)
    unreachable = WebSocketRPCClient(WebSocketRPCConfig(redis_url="redis://127.0.0.1:1/0"))
    started = time.perf_counter()
    assert unreachable.health_check(timeout=1) is False
    assert time.perf_counter() - started < 6
    with pytest.raises(RPCConnectionError):
        unreachable.call("add", Add(a=1, b=1), Sum, timeout=1)


def test_200_threads_share_a_small_pool(server: RPCServer, config: WebSocketRPCConfig) -> None:
    small = WebSocketRPCClient(
        config.model_copy(update={"redis_max_connections": 10, "redis_pool_timeout": 30})
    )
    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(
            pool.map(lambda i: small.call("add", Add(a=i, b=1), Sum, timeout=30).total, range(200))
        )
    assert results == [i + 1 for i in range(200)]
    pool = small.redis.connection_pool
    # The setting reached the pool, and the 200 callers really shared its 10 connections
    # (they waited for one instead of failing with "Too many connections").
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 10
    assert len(pool._connections) == 10


def test_expired_request_is_dropped_not_run(server: RPCServer, config: WebSocketRPCConfig) -> None:
    io = StreamIO(redis.Redis.from_url(config.redis_url))
    stale = json.dumps(
        {
            "correlation_id": "stale-1",
            "timestamp": "2020-01-01T00:00:00Z",
            "method": "add",
            "reply_to": config.response_key_prefix + "stale-1",
            "timeout": 5,
            "params": {"a": 1, "b": 2},
        }
    ).encode()
    io.add_request(config.request_stream, stale, 1000)
    wait_until(lambda: server.counters["expired"] == 1)
    assert server.calls == []  # type: ignore[attr-defined]
    assert reply_keys(config.redis_url, config.response_key_prefix) == []


def test_poison_entries_go_to_the_dead_letter_stream(
    server: RPCServer, client: WebSocketRPCClient, config: WebSocketRPCConfig
) -> None:
    r = redis.Redis.from_url(config.redis_url)
    r.xadd(config.request_stream, {"payload": b"{not json"})
    r.xadd(config.request_stream, {"something": b"else"})
    reply_to = config.response_key_prefix + "poison-3"
    r.xadd(
        config.request_stream,
        {
            "payload": json.dumps(
                {
                    "correlation_id": "poison-3",
                    "timestamp": "nonsense",
                    "method": "add",
                    "reply_to": reply_to,
                    "timeout": 5,
                    "params": {},
                    "extensions": ["error_details"],  # else the code is the older peers' invalid_params
                }
            ).encode()
        },
    )
    raw = ReplyChannel(r, prefix=config.response_key_prefix).wait(reply_to, 5)
    assert raw is not None
    err = protocol.decode_response(raw).error
    assert err is not None and err.code is RPCErrorCode.INVALID_REQUEST and "timestamp" in err.message
    wait_until(lambda: r.xlen(server.dead_letter_stream) == 3)
    reasons = [f[b"reason"].decode() for _, f in r.xrange(server.dead_letter_stream)]
    assert any("not valid JSON" in x for x in reasons) and any("no 'payload'" in x for x in reasons)
    # still serving, nothing left pending
    assert client.call("add", Add(a=1, b=1), Sum, timeout=5).total == 2
    assert StreamIO(r).backlog(config.request_stream, config.consumer_group)[0] == 0


def test_entry_delivered_too_often_is_dead_lettered_with_a_reply(config: WebSocketRPCConfig) -> None:
    r = redis.Redis.from_url(config.redis_url)
    io = StreamIO(r)
    io.ensure_group(config.request_stream, config.consumer_group)
    reply_to = config.response_key_prefix + "stuck-1"
    io.add_request(
        config.request_stream,
        protocol.encode_request(
            "add",
            Add(a=1, b=1),
            reply_to=reply_to,
            timeout=30,
            correlation_id="stuck-1",
            extensions={"error_details"},
        ),
        1000,
    )
    assert len(io.read(config.request_stream, config.consumer_group, "doomed", 10, 100)) == 1  # never acked
    srv = make_server(config, max_deliveries=1, claim_idle=0.2, claim_interval=0.1)
    srv.start()
    try:
        raw = ReplyChannel(r, prefix=config.response_key_prefix).wait(reply_to, 5)
    finally:
        srv.stop(10)
    assert raw is not None
    assert "delivered 2 times" in protocol.decode_response(raw).error.message  # type: ignore[union-attr]
    assert r.xlen(srv.dead_letter_stream) == 1
    assert srv.calls == []  # type: ignore[attr-defined]


def test_graceful_stop_finishes_in_flight(config: WebSocketRPCConfig, client: WebSocketRPCClient) -> None:
    srv = make_server(config)
    srv.start()
    out: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: out.update(r=client.call("slow", Add(a=800, b=0), Sum, timeout=5))
    )
    thread.start()
    wait_until(lambda: StreamIO(client.redis).backlog(config.request_stream, config.consumer_group)[0] == 1)
    assert srv.stop(10)
    thread.join(5)
    assert out["r"].total == 800
    assert StreamIO(client.redis).backlog(config.request_stream, config.consumer_group)[0] == 0


def test_call_logging_never_logs_params_unless_enabled(
    server: RPCServer, config: WebSocketRPCConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpc_tasks.streams.client")
    quiet = WebSocketRPCClient(config.model_copy(update={"log_rpc_calls": True}))
    quiet.call("add", Add(a=31337, b=1), Sum, timeout=5)
    line = next(r.getMessage() for r in caplog.records if "rpc call" in r.getMessage())
    assert (
        "method=add" in line and "correlation_id=" in line and "duration_ms=" in line and "outcome=ok" in line
    )
    assert "31337" not in caplog.text
    loud = WebSocketRPCClient(config.model_copy(update={"log_rpc_calls": True, "log_rpc_params": True}))
    loud.call("add", Add(a=31337, b=1), Sum, timeout=5)
    assert "31337" in caplog.text


def test_get_rpc_client_is_a_thread_safe_singleton(
    config: WebSocketRPCConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBSOCKET_RPC_REDIS_URL", config.redis_url)
    monkeypatch.setenv("WEBSOCKET_RPC_REQUEST_STREAM", config.request_stream)
    first = get_rpc_client(force_new=True)
    with ThreadPoolExecutor(max_workers=20) as pool:
        clients = set(map(id, pool.map(lambda _: get_rpc_client(), range(100))))
    assert clients == {id(first)}
    assert first.config.request_stream == config.request_stream
    assert get_rpc_client(force_new=True) is not first


def test_killed_consumer_entries_are_reclaimed_by_another(config: WebSocketRPCConfig, redis_url: str) -> None:
    from tests.integration import stream_app

    stream = config.request_stream
    proc, app_config = stream_app.serve(redis_url, stream, config.response_key_prefix)
    client = WebSocketRPCClient(app_config)
    r = redis.Redis.from_url(redis_url)
    results: dict[str, Any] = {}

    def call(job: str) -> None:
        try:
            results[job] = client.call(
                "work", stream_app.Work(job=job, seconds=2), stream_app.Done, timeout=60
            )
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            results[job] = exc

    threads = [threading.Thread(target=call, args=(f"j{i}",)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: r.llen(stream_app.LOG_KEY) >= 3, timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = {x.decode().split(":")[2] for x in r.lrange(stream_app.LOG_KEY, 0, -1)}
        rescuer = RPCServer(app_config, claim_idle=1.0, claim_interval=0.3, consumer_name="rescuer")
        rescuer.register(
            "work",
            stream_app.work.__wrapped__ if hasattr(stream_app.work, "__wrapped__") else stream_app.work,
        )
        rescuer.start()
        for t in threads:
            t.join(60)
        rescuer.stop(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert all(isinstance(v, stream_app.Done) for v in results.values()), results
    assert len(results) == 3
    assert rescuer.counters["reclaimed"] == 3
    assert killed and "rescuer" not in killed
    assert StreamIO(r).backlog(stream, config.consumer_group)[0] == 0


def test_slow_handler_is_not_reclaimed_by_a_live_peer(
    config: WebSocketRPCConfig, client: WebSocketRPCClient
) -> None:
    runs: list[str] = []

    def build(name: str) -> RPCServer:
        srv = RPCServer(config, consumer_name=name, claim_idle=0.4, claim_interval=0.1)

        @srv.method("slow")
        def slow(params: Add) -> Sum:
            runs.append(name)
            time.sleep(1.5)
            return Sum(total=params.a)

        return srv

    servers = [build("one"), build("two")]
    for srv in servers:
        srv.start()
    try:
        assert client.call("slow", Add(a=7, b=0), Sum, timeout=10).total == 7
    finally:
        for srv in servers:
            srv.stop(10)
    assert len(runs) == 1, runs


def test_call_whose_request_cannot_be_added_fails_at_once(config: WebSocketRPCConfig) -> None:
    """The request's XADD and the reply's BLPOP go out in one write; if the XADD fails (here the
    stream name holds a string), the caller gets RPCConnectionError at once, not a timeout."""
    client = WebSocketRPCClient(config)
    client.redis.set(config.request_stream, "not a stream")
    started = time.monotonic()
    with pytest.raises(RPCConnectionError, match="XADD"):
        client.call("add", Add(a=1, b=2), Sum, timeout=5)
    assert time.monotonic() - started < 1
    client.redis.delete(config.request_stream)
    assert reply_keys(config.redis_url, config.response_key_prefix) == []


def test_serving_mode_follows_the_pool_size(config: WebSocketRPCConfig) -> None:
    server = RPCServer(config, concurrency=8)
    assert server.io.pin is (config.redis_max_connections >= 20)


def test_restarting_a_server_in_one_process_reuses_its_connections(config: WebSocketRPCConfig) -> None:
    """Reader threads keep a connection each and give it back when the server stops: a pool
    exactly as large as the reader-per-thread mode needs survives many stop/start cycles."""
    small = config.model_copy(update={"redis_max_connections": 2 * 3 + 4, "redis_pool_timeout": 1.0})
    server = make_server(small, concurrency=3, claim_interval=0.2)
    assert server.io.pin
    client = WebSocketRPCClient(small)
    try:
        for round_ in range(6):
            server.start()
            assert client.call("add", Add(a=round_, b=1), Sum, timeout=5).total == round_ + 1
            assert server.stop(10)
    finally:
        client.close()


def test_handler_raising_system_exit_gets_an_error_reply(
    server: RPCServer, client: WebSocketRPCClient
) -> None:
    """A handler that calls ``sys.exit()`` answers with an internal error at once (no
    redelivery loop), and the server keeps serving."""
    started = time.monotonic()
    with pytest.raises(RPCRemoteError) as info:
        client.call("exits", Add(a=1, b=2), Sum, timeout=5)
    assert info.value.error.code == RPCErrorCode.INTERNAL_ERROR
    assert "SystemExit" in info.value.error.message
    assert time.monotonic() - started < 2
    assert client.call("add", Add(a=1, b=2), Sum, timeout=5).total == 3


def test_server_on_a_client_with_a_short_socket_timeout(
    config: WebSocketRPCConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis client whose socket_timeout (0.1 s) is far shorter than the server's blocking
    read (1 s): idle readers wait for their reads instead of failing every time."""
    from rpc_tasks.redis.connection import make_redis

    redis_client = make_redis(
        config.redis_url, max_connections=config.redis_max_connections, socket_timeout=0.1
    )
    server = make_server(config, redis_client=redis_client, concurrency=2, claim_interval=1.0)
    client = WebSocketRPCClient(config)
    with caplog.at_level(logging.WARNING, logger="rpc_tasks"):
        server.start()
        try:
            time.sleep(1.5)  # idle: several blocking reads
            assert client.call("add", Add(a=2, b=3), Sum, timeout=5).total == 5
        finally:
            assert server.stop(10)
            client.close()
    assert [r.getMessage() for r in caplog.records if r.name == "rpc_tasks.streams.server"] == []


@pytest.mark.parametrize("max_connections", [50, 12], ids=["readers", "one-reader"])
def test_server_recovers_after_redis_restart(max_connections: int) -> None:
    """Redis killed under a running RPCServer and started again (same port, empty data): the
    server keeps retrying, recreates its group and serves again, in both serving modes."""
    from .support import PrivateRedis

    with PrivateRedis() as redis_server:
        cfg = WebSocketRPCConfig(
            redis_url=redis_server.url(db=1),
            request_stream=unique("stream"),
            response_key_prefix=unique("resp") + ":",
            consumer_group=unique("group"),
            redis_max_connections=max_connections,
        )
        server = make_server(cfg, concurrency=8, claim_interval=0.3)
        client = WebSocketRPCClient(cfg)
        server.start()
        try:
            assert client.call("add", Add(a=1, b=1), Sum, timeout=5).total == 2
            redis_server.kill()
            time.sleep(1.5)  # several failed reads and maintenance passes
            redis_server.start()

            def serves() -> bool:
                try:
                    return client.call("add", Add(a=2, b=2), Sum, timeout=1).total == 4
                except Exception:
                    return False

            assert wait_until(serves, timeout=20, interval=0.2)
            assert_full_concurrency(server, client, 8)
        finally:
            assert server.stop(10)
            client.close()


def assert_full_concurrency(server: RPCServer, client: WebSocketRPCClient, concurrency: int) -> None:
    """``concurrency`` slow requests at once all run at the same time (no handler slot lost)."""
    gauge = server.gauge  # type: ignore[attr-defined]
    gauge["peak"] = 0
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(
            pool.map(lambda _: client.call("slow", Add(a=400, b=0), Sum, timeout=10), range(concurrency))
        )
    assert [r.total for r in results] == [400] * concurrency
    assert gauge["peak"] == concurrency


def test_failed_reclaim_pass_keeps_every_handler_slot(
    config: WebSocketRPCConfig, client: WebSocketRPCClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing in the middle of a maintenance pass (after the pass took the free handler
    slots to reclaim entries) gives the slots back: the server still runs ``concurrency``
    requests at once afterwards."""
    from rpc_tasks import RPCConnectionError as ConnErr

    # A failed pass holds reclaiming off for claim_idle (an outage): keep it short here.
    server = make_server(config, concurrency=4, claim_interval=0.2, claim_idle=0.4)
    real_autoclaim = server.io.autoclaim
    failures = {"left": 3}

    def flaky_autoclaim(*args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnErr("Redis XAUTOCLAIM failed: injected")
        return real_autoclaim(*args, **kwargs)

    monkeypatch.setattr(server.io, "autoclaim", flaky_autoclaim)
    server.start()
    try:
        wait_until(lambda: failures["left"] == 0, timeout=10)
        assert_full_concurrency(server, client, 4)
    finally:
        assert server.stop(10)


def test_client_and_server_over_resp3(config: WebSocketRPCConfig) -> None:
    """``?protocol=3`` in the Redis URL (RESP3 replies, e.g. dicts for XREADGROUP): calls,
    errors and health checks work as over RESP2."""
    cfg = config.model_copy(update={"redis_url": config.redis_url + "?protocol=3"})
    server = make_server(cfg, concurrency=2, claim_interval=0.5)
    client = WebSocketRPCClient(cfg)
    server.start()
    try:
        assert client.call("add", Add(a=20, b=22), Sum, timeout=5).total == 42
        with pytest.raises(RPCRemoteError):
            client.call("crash", Add(a=1, b=1), Sum, timeout=5)
        assert client.health_check(timeout=5)
    finally:
        assert server.stop(10)
        client.close()
