"""RPCServer operations against real Redis: trimmed pending entries and the backlog warning,
reply addresses outside ``response_key_prefix`` (a security check), and the ``rpc-tasks``
command line (``health`` exit codes, ``serve`` stopping on SIGTERM)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
import redis

from rpc_tasks import RPCServer, WebSocketRPCClient, WebSocketRPCConfig, protocol
from rpc_tasks.streams.io import StreamIO

from .support import unique, wait_until
from .test_streams import ROOT, Add, Sum, client, config, make_server, server

pytestmark = pytest.mark.redis
__all__ = ["client", "config", "server"]  # fixtures shared with test_streams.py


def test_pending_entries_trimmed_away_are_dead_lettered_as_trimmed(
    config: WebSocketRPCConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries a dead consumer left pending and that the stream's MAXLEN trimmed away are
    recorded on the dead-letter stream with reason ``trimmed`` (and logged as errors)."""
    caplog.set_level(logging.ERROR)
    r = redis.Redis.from_url(config.redis_url)
    io = StreamIO(r)
    io.ensure_group(config.request_stream, config.consumer_group)
    for i in range(3):
        io.add_request(
            config.request_stream,
            protocol.encode_request("add", Add(a=i, b=0), reply_to="", timeout=0, correlation_id=f"t{i}"),
            1000,
        )
    lost = [
        entry_id for entry_id, _ in io.read(config.request_stream, config.consumer_group, "dead", 10, 100)
    ]
    assert len(lost) == 3
    r.xtrim(config.request_stream, maxlen=0, approximate=False)  # what MAXLEN ~ does to an old backlog
    srv = make_server(config, claim_idle=0.2, claim_interval=0.1)
    srv.start()
    try:
        wait_until(lambda: r.xlen(srv.dead_letter_stream) == 3, timeout=10)
    finally:
        srv.stop(10)
    dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(srv.dead_letter_stream)]
    assert sorted(d["entry_id"] for d in dead) == sorted(lost)
    assert {d["reason"] for d in dead} == {"trimmed"}
    assert io.backlog(config.request_stream, config.consumer_group)[0] == 0, "acked: not reported again"
    assert sum("was trimmed" in rec.getMessage() for rec in caplog.records) == 3
    assert srv.calls == []  # type: ignore[attr-defined]


def test_backlog_over_half_of_stream_maxlen_is_warned(
    config: WebSocketRPCConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    small = config.model_copy(update={"stream_maxlen": 20})
    client = WebSocketRPCClient(small)
    for i in range(12):  # 12 > 20 / 2, all in flight at once (slow handlers)
        client.fire_and_forget("slow", Add(a=600, b=i))
    srv = make_server(small, concurrency=16, claim_idle=0.2, claim_interval=0.1)
    srv.start()
    try:
        wait_until(lambda: srv.gauge["peak"] == 12, timeout=10)  # type: ignore[attr-defined]
        wait_until(lambda: any("backlog" in rec.getMessage() for rec in caplog.records), timeout=10)
    finally:
        srv.stop(10)
        client.close()
    warning = next(rec for rec in caplog.records if "backlog" in rec.getMessage())
    assert warning.levelno == logging.WARNING
    assert "stream_maxlen=20" in warning.getMessage() and small.request_stream in warning.getMessage()


def test_reply_to_outside_the_prefix_is_never_written(
    server: RPCServer, config: WebSocketRPCConfig, client: WebSocketRPCClient
) -> None:
    """Security: a request whose ``reply_to`` is not under ``response_key_prefix`` (here a key
    some other part of the application owns) is dead-lettered unrun, and nothing is written
    there."""
    r = redis.Redis.from_url(config.redis_url)
    victim = unique("app:session")
    r.set(victim, "precious")
    raw = protocol.encode_request("add", Add(a=1, b=1), reply_to=victim, timeout=5, correlation_id="evil-1")
    StreamIO(r).add_request(config.request_stream, raw, 1000)
    wait_until(lambda: r.xlen(server.dead_letter_stream) == 1, timeout=10)
    fields = {k.decode(): v for k, v in r.xrange(server.dead_letter_stream)[0][1].items()}
    assert "response_key_prefix" in fields["reason"].decode()
    assert r.get(victim) == b"precious" and r.type(victim) == b"string"
    assert server.calls == []  # type: ignore[attr-defined]
    # Positive control: the same request with a proper reply address is answered.
    assert client.call("add", Add(a=1, b=1), Sum, timeout=5).total == 2


def _cli_env(config: WebSocketRPCConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        WEBSOCKET_RPC_REDIS_URL=config.redis_url,
        WEBSOCKET_RPC_REQUEST_STREAM=config.request_stream,
        WEBSOCKET_RPC_CONSUMER_GROUP=config.consumer_group,
        WEBSOCKET_RPC_RESPONSE_KEY_PREFIX=config.response_key_prefix,
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("config", ["readers"], indirect=True)  # the mode is the app's own
def test_cli_health_exit_codes(config: WebSocketRPCConfig) -> None:
    """``rpc-tasks health`` exits 0 when a server answers ``ping``, 1 otherwise (no server,
    or no Redis)."""

    def health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rpc_tasks.cli", "health", "--timeout", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    env = _cli_env(config)
    nobody = health(env)
    assert nobody.returncode == 1 and "no server answered ping" in nobody.stdout, nobody
    srv = make_server(config)
    srv.start()
    try:
        answered = health(env)
    finally:
        srv.stop(10)
    assert answered.returncode == 0 and "a server answered ping" in answered.stdout, answered
    no_redis = health({**env, "WEBSOCKET_RPC_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert no_redis.returncode == 1, no_redis


@pytest.mark.slow
@pytest.mark.parametrize("config", ["readers"], indirect=True)  # the mode is the app's own
def test_cli_serve_stops_gracefully_on_sigterm(config: WebSocketRPCConfig, redis_url: str) -> None:
    """SIGTERM to ``rpc-tasks serve``: the request in flight finishes, is answered and acked,
    and the process exits 0."""
    from tests.integration import stream_app

    proc, app_config = stream_app.serve(redis_url, config.request_stream, config.response_key_prefix)
    client = WebSocketRPCClient(app_config)
    r = redis.Redis.from_url(redis_url)
    job = unique("job")
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(
            client.call("work", stream_app.Work(job=job, seconds=1.5), stream_app.Done, timeout=60)
        )
    )
    try:
        thread.start()
        wait_until(lambda: f"start:{job}".encode() in b" ".join(r.lrange(stream_app.LOG_KEY, 0, -1)), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        thread.join(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert not thread.is_alive() and len(results) == 1 and results[0].job == job
    log = [x.decode() for x in r.lrange(stream_app.LOG_KEY, 0, -1)]
    assert any(x.startswith(f"done:{job}:") for x in log), log
    assert StreamIO(r).backlog(config.request_stream, stream_app.config.consumer_group)[0] == 0, "acked"
    client.close()
