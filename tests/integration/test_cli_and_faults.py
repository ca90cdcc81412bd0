"""Workers started with the ``dramatiq`` CLI, and fault tests: a worker killed mid-message,
Redis killed under a waiting caller and restarted, AUTH and TLS connections."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
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

from rpc_tasks import (
    RPCConnectionError,
    RPCTimeoutError,
    WebSocketRPCConfig,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.redis.broker import BlockingRedisBroker

from .support import PrivateRedis, running_worker, unique, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


class CLIWorker:
    def __init__(self, redis_url: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.integration.cli_app",
                "--processes",
                "1",
                "--threads",
                "2",
            ],
            cwd=ROOT,
            env={**os.environ, "RPC_TEST_REDIS_URL": redis_url, **env},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@pytest.fixture
def cli_app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CLI_APP_HEARTBEAT_MS", "1500")
    monkeypatch.setenv("CLI_APP_MAINTENANCE_CHANCE", "1000000")
    from tests.integration import cli_app

    return cli_app


def test_dramatiq_cli_worker_serves_send_and_call(cli_app: Any, redis_url: str) -> None:
    worker = CLIWorker(redis_url)
    try:
        # One call with room for the worker process to start: the message waits in the queue.
        result = cli_app.add.call(cli_app.AddParams(a=2, b=3), timeout=60)
        assert result.total == 5
        assert result.pid != os.getpid(), "the result must come from the worker process"
        cli_app.job.send(cli_app.JobParams(job_id="bg", seconds=0))
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: any(x.startswith(b"done:bg:") for x in client.lrange(cli_app.LOG_KEY, 0, -1)))
    finally:
        assert worker.stop() == 0


def test_worker_killed_mid_message_is_redelivered_and_caller_still_answered(
    cli_app: Any, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    first = CLIWorker(redis_url)
    second: CLIWorker | None = None
    outcome: dict[str, Any] = {}

    def caller() -> None:
        try:
            outcome["result"] = cli_app.job.call(cli_app.JobParams(job_id="crash", seconds=2), timeout=40)
        except Exception as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=caller)
    try:
        thread.start()
        wait_until(
            lambda: any(x.startswith(b"start:crash:") for x in client.lrange(cli_app.LOG_KEY, 0, -1)),
            timeout=30,
        )
        first.kill()  # SIGKILL mid-message: no ack, no reply
        killed_pid = int(client.lrange(cli_app.LOG_KEY, 0, -1)[0].split(b":")[2])
        second = CLIWorker(redis_url)
        thread.join(45)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.job_id == "crash"
        assert result.pid != killed_pid, "the redelivered message ran in the new worker"
        log = [x.decode() for x in client.lrange(cli_app.LOG_KEY, 0, -1)]
        assert [x for x in log if x.startswith("done:crash")] == [f"done:crash:{result.pid}"]
    finally:
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            second.stop()


class Slow(BaseModel):
    seconds: float


class Done(BaseModel):
    ok: bool


def _ok_actor(config: WebSocketRPCConfig) -> Any:
    """A BlockingRedisBroker on ``config.redis_url`` (own namespace) and its ``ok`` actor."""
    broker = BlockingRedisBroker(url=config.redis_url, namespace=unique("ns"))
    setup_broker(broker, config=config, set_global=False)

    @rpc_actor(broker=broker, queue_name=unique("q"), actor_name="ok")
    def ok(params: Slow) -> Done:
        return Done(ok=True)

    return ok


@contextlib.contextmanager
def _done_server(config: WebSocketRPCConfig) -> Iterator[Any]:
    """A Streams ``RPCServer`` with a ``done`` method on ``config``, and a client for it."""
    from rpc_tasks import RPCServer, WebSocketRPCClient

    srv = RPCServer(config, concurrency=2)

    @srv.method("done")
    def done(params: Slow) -> Done:
        return Done(ok=True)

    srv.start()
    client = WebSocketRPCClient(config)
    try:
        yield client
    finally:
        client.close()
        assert srv.stop(10)


def test_redis_killed_under_a_waiting_caller_then_restarted() -> None:
    with PrivateRedis() as server:
        url = server.url()
        config = WebSocketRPCConfig(redis_url=url)
        broker = BlockingRedisBroker(url=url, namespace=unique("ns"))
        setup_broker(broker, config=config, set_global=False)

        @rpc_actor(broker=broker, queue_name=unique("q"), max_retries=0)
        def slow(params: Slow) -> Done:
            time.sleep(params.seconds)
            return Done(ok=True)

        with running_worker(broker):
            assert slow.call(Slow(seconds=0), timeout=5).ok
            errors: list[BaseException] = []

            def waiting() -> None:
                try:
                    slow.call(Slow(seconds=3), timeout=30)
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=waiting)
            thread.start()
            time.sleep(0.5)
            started = time.monotonic()
            server.kill()
            thread.join(10)
            assert not thread.is_alive(), "the caller must not hang until its timeout"
            assert time.monotonic() - started < 5
            assert len(errors) == 1 and isinstance(errors[0], RPCConnectionError), errors

            with pytest.raises(RPCConnectionError):
                slow.call(Slow(seconds=0), timeout=1)
            server.start()  # same port, empty data

            def recovered() -> bool:
                try:
                    return slow.call(Slow(seconds=0), timeout=1).ok
                except (RPCConnectionError, RPCTimeoutError):  # not back yet; anything else fails
                    return False

            assert wait_until(recovered, timeout=30, interval=0.2)


def test_redis_auth_works_and_password_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cret-" + unique("pw")
    caplog.set_level(logging.DEBUG)
    with PrivateRedis("--requirepass", password) as server:
        url = server.url(password=password)
        config = WebSocketRPCConfig(redis_url=url)
        assert password not in repr(config) and password not in str(config.redacted())
        ok = _ok_actor(config)
        with running_worker(ok.broker):
            assert ok.call(Slow(seconds=0), timeout=5).ok

        ok_bad = _ok_actor(WebSocketRPCConfig(redis_url=server.url(password="wrong-" + password)))
        with pytest.raises(RPCConnectionError) as info:
            ok_bad.call(Slow(seconds=0), timeout=1)
        assert password not in str(info.value)
    assert password not in caplog.text


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")  # --require-services makes this a failure
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
    )
    if made.returncode != 0:  # a skip that --require-services turns into a failure (tests/conftest.py)
        why = made.stderr.decode(errors="replace")[-300:]
        pytest.skip(f"openssl could not make a test certificate: {why}")
    yield cert, key


def _tls_redis(cert: Path, key: Path) -> PrivateRedis:
    """A private redis-server serving TLS only (plain TCP off) on its port."""
    probe = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    if "redis" not in probe.stdout.lower():
        pytest.skip("redis-server not installed")
    server = PrivateRedis(
        "--tls-port",
        "0",
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    # Serve TLS on the chosen port, plain TCP off.
    server.extra = ["--port", "0", "--tls-port", str(server.port), *server.extra[2:]]
    return server


def test_rediss_tls_connection(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    with _tls_redis(cert, key) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        ok = _ok_actor(WebSocketRPCConfig(redis_url=url))
        with running_worker(ok.broker):
            assert ok.call(Slow(seconds=0), timeout=5).ok


def test_streams_client_and_server_over_tls(tls_files: tuple[Path, Path]) -> None:
    """``rediss://`` for the Streams client and server: a call, and a certificate the client
    does not trust is refused."""
    from rpc_tasks import WebSocketRPCClient

    cert, key = tls_files
    with _tls_redis(cert, key) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        config = WebSocketRPCConfig(
            redis_url=url, request_stream=unique("stream"), response_key_prefix=unique("resp") + ":"
        )
        with _done_server(config) as client:
            assert client.call("done", Slow(seconds=0), Done, timeout=10).ok
            assert client.health_check(timeout=5) is True
        untrusting = WebSocketRPCClient(config.model_copy(update={"redis_url": url.split("?")[0]}))
        with pytest.raises(RPCConnectionError):
            untrusting.call("done", Slow(seconds=0), Done, timeout=2)
        untrusting.close()


def test_unix_socket_redis_url_for_calls_and_streams() -> None:
    """``unix://`` Redis URLs (documented for ``redis_url``): a Dramatiq ``.call()`` with the
    reply pushed in the ack's script (same socket path and DB), and a Streams call."""
    with PrivateRedis(unix_socket=True) as server:
        url = server.unix_url(db=2)
        config = WebSocketRPCConfig(
            redis_url=url, request_stream=unique("stream"), response_key_prefix=unique("resp") + ":"
        )
        ok = _ok_actor(config)
        broker = ok.broker
        with running_worker(broker):
            assert ok.call(Slow(seconds=0), timeout=5).ok
        assert broker._pending_replies == {}
        with _done_server(config) as client:
            assert client.call("done", Slow(seconds=0), Done, timeout=10).ok
        direct = redis.Redis(unix_socket_path=server.socket_path, db=2)
        assert direct.exists(f"{broker.namespace}:{ok.queue_name}.msgs") == 0
        assert direct.xlen(config.request_stream) == 1, "the Streams request went to DB 2 over the socket"
        direct.close()
