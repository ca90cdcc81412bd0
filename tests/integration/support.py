"""Helpers for integration tests: real brokers with unique namespaces, in-process workers,
private redis-server processes for fault tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import redis

from rpc_tasks import WebSocketRPCConfig, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


#: Broker class of :func:`redis_broker` (tests of the plain RedisBroker swap it).
BROKER_CLASS: Any = BlockingRedisBroker


def redis_broker(url: str, **kwargs: Any) -> tuple[dramatiq.Broker, WebSocketRPCConfig]:
    """A Redis broker in its own namespace, set up for rpc-tasks (replies on the same DB)."""
    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("test:resp") + ":")
    broker = BROKER_CLASS(url=url, namespace=unique("ns"), **kwargs)
    setup_broker(broker, config=config, set_global=False)
    return broker, config


@contextlib.contextmanager
def running_worker(
    broker: dramatiq.Broker, threads: int = 2, worker_timeout: int = 50, **kwargs: Any
) -> Iterator[dramatiq.Worker]:
    """An in-process ``dramatiq.Worker`` (short poll interval unless told otherwise)."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=worker_timeout, **kwargs)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A throw-away ``redis-server`` on a free port (for restart/AUTH tests)."""

    def __init__(self, *extra: str) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.server = server
        self.port = free_port()
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="rpc-tasks-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def reply_keys(url: str, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()
