"""RPCServer under faults: reclaim bookkeeping, Redis outages longer than ``claim_idle``
(``CONFIG SET maxmemory``, ``CLIENT PAUSE`` on a private redis-server), oversized and
undeliverable requests, failed fire-and-forget requests."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import RPCServer, WebSocketRPCConfig, protocol
from rpc_tasks.models.base import new_correlation_id

from .support import PrivateRedis, unique, wait_until

pytestmark = pytest.mark.redis


class Job(BaseModel):
    n: int
    sleep_ms: int = 0


class Done(BaseModel):
    n: int


def stream_config(url: str, **kwargs: Any) -> WebSocketRPCConfig:
    return WebSocketRPCConfig(
        redis_url=url,
        request_stream=unique("stream"),
        response_key_prefix=unique("resp") + ":",
        consumer_group=unique("group"),
        **kwargs,
    )


class Recorder:
    """A handler that records every run (start and end) by job number."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: Counter[int] = Counter()
        self.ended: Counter[int] = Counter()

    def __call__(self, params: Job) -> Done:
        with self.lock:
            self.started[params.n] += 1
        time.sleep(params.sleep_ms / 1000)
        with self.lock:
            self.ended[params.n] += 1
        return Done(n=params.n)

    def running(self) -> int:
        with self.lock:
            return sum(self.started.values()) - sum(self.ended.values())


def make_server(config: WebSocketRPCConfig, recorder: Recorder, **kwargs: Any) -> RPCServer:
    server = RPCServer(config, **kwargs)
    server.register("job", recorder, params_model=Job, result_model=Done)
    return server


def request(config: WebSocketRPCConfig, n: int, sleep_ms: int = 0, timeout: int = 30) -> tuple[bytes, str]:
    correlation_id = new_correlation_id()
    reply_to = protocol.reply_key(config.response_key_prefix, correlation_id)
    payload = protocol.encode_request(
        "job", Job(n=n, sleep_ms=sleep_ms), reply_to=reply_to, timeout=timeout, correlation_id=correlation_id
    )
    return payload, reply_to


def pending_count(client: redis.Redis, config: WebSocketRPCConfig) -> int:
    return int(client.xpending(config.request_stream, config.consumer_group)["pending"])


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    with PrivateRedis("--maxmemory-policy", "noeviction") as server:
        yield server


# -- 19 row 2: reclaim bookkeeping -----------------------------------------------------------------


def test_reclaimed_entry_among_other_consumers_pending_entries_runs(redis_url: str) -> None:
    """Entries of a dead consumer whose ids straddle many pending entries of a live consumer
    (one ``XAUTOCLAIM`` takes both):
    every reclaimed entry runs once, none is dead-lettered as "delivered too often"."""
    config = stream_config(redis_url)
    client = redis.Redis.from_url(redis_url)
    stream, group = config.request_stream, config.consumer_group
    client.xgroup_create(stream, group, id="0", mkstream=True)
    replies = []
    for n in range(21):
        payload, reply_to = request(config, n)
        client.xadd(stream, {"payload": payload})
        replies.append(reply_to)
    first = client.xreadgroup(group, "dead", {stream: ">"}, count=1)[0][1]
    others = client.xreadgroup(group, "alive", {stream: ">"}, count=19)[0][1]
    last = client.xreadgroup(group, "dead", {stream: ">"}, count=1)[0][1]
    assert len(first) == len(last) == 1 and len(others) == 19
    time.sleep(1.2)  # the dead consumer's entries are idle longer than claim_idle
    # The live consumer's entries are fresh (it keeps touching them).
    client.xclaim(stream, group, "alive", 0, [e[0] for e in others], justid=True)

    recorder = Recorder()
    server = make_server(config, recorder, claim_interval=0.5, claim_idle=1.0, concurrency=4)
    server.start()
    try:
        for reply_to in (replies[0], replies[20]):
            popped = client.blpop([reply_to], timeout=10)
            assert popped is not None, "no reply"
            response = protocol.decode_response(popped[1])
            assert response.success, response.error
        assert recorder.started[0] == 1 and recorder.started[20] == 1
        assert server.counters["dead"] == 0
        assert client.xlen(f"{stream}:dead") == 0
    finally:
        assert server.stop(10)
        client.close()


# -- 19 row 3: outages longer than claim_idle ------------------------------------------------------


def _outage_trial(private_redis: PrivateRedis, outage: str) -> Recorder:
    """Two servers (room for 8 handlers each), 6 slow requests split between them; a 3 s
    outage while every handler runs (claim_idle is 1 s); returns who ran what once everything
    is acked and nothing runs."""
    url = private_redis.url()
    config = stream_config(url)
    admin = redis.Redis.from_url(url)
    recorder = Recorder()
    servers = [
        make_server(config, recorder, claim_interval=0.5, claim_idle=1.0, concurrency=8, consumer_name=name)
        for name in ("a", "b")
    ]
    try:
        for server in servers:
            server.start()
        wait_until(lambda: admin.exists(config.request_stream), 10)
        for n in range(6):
            payload, _ = request(config, n, sleep_ms=4500)
            admin.xadd(config.request_stream, {"payload": payload})
        wait_until(lambda: len(recorder.started) == 6, 10)
        if outage == "maxmemory":
            admin.config_set("maxmemory", 1)
            time.sleep(3.0)
            admin.config_set("maxmemory", 0)
        else:
            admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        wait_until(lambda: pending_count(admin, config) == 0 and recorder.running() == 0, 30)
        return recorder
    finally:
        admin.config_set("maxmemory", 0)
        for server in servers:
            assert server.stop(15)
        admin.close()


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["maxmemory", "client-pause"])
def test_in_flight_requests_run_once_across_an_outage_longer_than_claim_idle(
    private_redis: PrivateRedis, outage: str
) -> None:
    # Before the fix, 3 of 4 (maxmemory) and 3 of 6 (CLIENT PAUSE) trials ran a request twice.
    for _ in range(3):
        recorder = _outage_trial(private_redis, outage)
        assert sorted(recorder.started) == list(range(6))
        twice = {n: c for n, c in recorder.started.items() if c != 1}
        assert twice == {}, f"ran more than once after a {outage} outage: {twice}"


def test_maintenance_touches_in_flight_entries_even_when_group_creation_is_refused(
    private_redis: PrivateRedis,
) -> None:
    """Over ``maxmemory``, ``XGROUP CREATE ... MKSTREAM`` is refused but ``XCLAIM`` is not:
    the in-flight entry's idle time keeps being reset."""
    url = private_redis.url()
    config = stream_config(url)
    admin = redis.Redis.from_url(url)
    recorder = Recorder()
    server = make_server(config, recorder, claim_interval=0.3, claim_idle=1.0, concurrency=2)
    try:
        server.start()
        wait_until(lambda: admin.exists(config.request_stream), 10)
        payload, _ = request(config, 1, sleep_ms=4000)
        admin.xadd(config.request_stream, {"payload": payload})
        wait_until(lambda: recorder.started[1] == 1, 10)
        admin.config_set("maxmemory", 1)
        worst = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            rows = admin.xpending_range(config.request_stream, config.consumer_group, "-", "+", 10)
            worst = max([worst] + [int(r["time_since_delivered"]) for r in rows])
            time.sleep(0.1)
        assert worst < 1000, f"in-flight entry left idle {worst} ms while Redis was over maxmemory"
    finally:
        admin.config_set("maxmemory", 0)
        assert server.stop(15)
        admin.close()


# -- 14.5 and 15.4: requests that cannot be served -------------------------------------------------


def test_oversized_request_gets_a_payload_too_large_reply_and_a_bounded_dead_letter(
    redis_url: str,
) -> None:
    config = stream_config(redis_url)
    client = redis.Redis.from_url(redis_url)
    recorder = Recorder()
    server = make_server(config, recorder, claim_interval=0.5)
    server.start()
    try:
        correlation_id = new_correlation_id()
        reply_to = protocol.reply_key(config.response_key_prefix, correlation_id)
        envelope = protocol.encode_request(
            "job",
            Job(n=1),
            reply_to=reply_to,
            timeout=30,
            correlation_id=correlation_id,
            extensions={protocol.ERROR_DETAILS_EXTENSION},  # as our clients do: full error codes
        )
        # Pad the params to 10 MB, keeping the envelope valid JSON.
        huge = envelope.replace(b'"n":1', b'"n":1,"pad":"' + b"x" * 10_000_000 + b'"', 1)
        assert len(huge) > 10_000_000
        wait_until(lambda: client.exists(config.request_stream), 10)
        client.xadd(config.request_stream, {"payload": huge})
        popped = client.blpop([reply_to], timeout=10)
        assert popped is not None, "the caller got no reply"
        response = protocol.decode_response(popped[1])
        assert not response.success and response.error is not None
        assert response.error.wire_code == "payload_too_large"
        assert response.correlation_id == correlation_id
        dead = client.xrange(f"{config.request_stream}:dead")
        assert len(dead) == 1
        fields = dead[0][1]
        assert len(fields[b"payload"]) <= 4096
        assert int(fields[b"payload_bytes"]) == len(huge)
        assert b"payload_too_large" in fields[b"reason"] or b"too large" in fields[b"reason"]
        assert recorder.started == Counter()
    finally:
        assert server.stop(10)
        client.close()


def test_reply_to_a_non_list_key_acks_without_expiring_it_and_logs_it(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = stream_config(redis_url)
    client = redis.Redis.from_url(redis_url)
    recorder = Recorder()
    server = make_server(config, recorder, claim_interval=0.5)
    payload, reply_to = request(config, 7)
    client.set(reply_to, b"not a list")  # no TTL
    caplog.set_level(logging.INFO, logger="rpc_tasks")
    server.start()
    try:
        client.xadd(config.request_stream, {"payload": payload})
        wait_until(lambda: recorder.ended[7] == 1, 10)
        wait_until(lambda: pending_count(client, config) == 0, 10)
        assert client.ttl(reply_to) == -1, "EXPIRE ran although the LPUSH failed"
        assert client.get(reply_to) == b"not a list"
        text = caplog.text
        assert "stays pending" not in text
        wait_until(lambda: "WRONGTYPE" in caplog.text and "acked" in caplog.text, 5)
    finally:
        assert server.stop(10)
        client.close()


@pytest.mark.parametrize(
    ("method", "params", "reason"),
    [("job", {"n": "not a number"}, "validation_error"), ("nope", {"n": 1}, "method_not_found")],
)
def test_failed_fire_and_forget_is_dead_lettered_and_logged_as_a_warning(
    redis_url: str, caplog: pytest.LogCaptureFixture, method: str, params: dict[str, Any], reason: str
) -> None:
    config = stream_config(redis_url)
    client = redis.Redis.from_url(redis_url)
    recorder = Recorder()
    server = make_server(config, recorder, claim_interval=0.5)
    caplog.set_level(logging.INFO, logger="rpc_tasks")
    server.start()
    try:
        cid = new_correlation_id()
        reply_to = protocol.reply_key(config.response_key_prefix, cid)
        payload = protocol.encode_request(method, params, reply_to=reply_to, timeout=0, correlation_id=cid)
        client.xadd(config.request_stream, {"payload": payload})
        dead = wait_until(lambda: client.xrange(f"{config.request_stream}:dead"), 10)
        assert reason.encode() in dead[0][1][b"reason"]
        assert pending_count(client, config) == 0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and reason in r.getMessage()]
        assert warnings, caplog.text
        assert "not a number" not in caplog.text, "params are not logged"
    finally:
        assert server.stop(10)
        client.close()


def test_replaced_rpc_client_closes_its_pool(private_redis: PrivateRedis, monkeypatch: Any) -> None:
    from rpc_tasks.streams import client as client_module

    monkeypatch.setenv("WEBSOCKET_RPC_REDIS_URL", private_redis.url())
    monkeypatch.setattr(client_module, "_client", None)
    admin = redis.Redis.from_url(private_redis.url())

    def connected() -> int:
        return int(admin.info("clients")["connected_clients"])

    baseline = connected()
    old = client_module.get_rpc_client(force_new=True)
    held = [old.redis.connection_pool.get_connection() for _ in range(6)]
    for conn in held:
        conn.send_command("PING")
        conn.read_response()
        old.redis.connection_pool.release(conn)
    assert connected() >= baseline + 6
    new = client_module.get_rpc_client(force_new=True)
    assert new is not old
    wait_until(lambda: connected() <= baseline, 5)
    new.close()
    admin.close()
