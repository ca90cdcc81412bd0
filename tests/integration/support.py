"""Helpers for integration tests: real brokers with unique namespaces, in-process workers,
private redis-server processes for fault tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from rpc_tasks import WebSocketRPCConfig, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


#: Which broker :func:`make_broker` builds: "blocking" (rpc-tasks' BlockingRedisBroker, the
#: default), "plain" (Dramatiq's RedisBroker) or "rabbitmq" (Dramatiq's RabbitmqBroker, replies
#: over Redis). Tests switch it with the ``broker_kind`` fixture (tests/conftest.py).
BROKER_KIND = "blocking"
#: RabbitMQ URL of the "rabbitmq" kind (set by the ``broker_kind`` fixture).
AMQP_URL = ""
_rabbit_brokers: list[dramatiq.Broker] = []


def redis_broker(url: str, **kwargs: Any) -> tuple[dramatiq.Broker, WebSocketRPCConfig]:
    """A Redis broker in its own namespace, set up for rpc-tasks (replies on the same DB):
    Dramatiq's plain RedisBroker when ``BROKER_KIND`` is "plain", else BlockingRedisBroker."""
    config = WebSocketRPCConfig(redis_url=url, response_key_prefix=unique("test:resp") + ":")
    cls = RedisBroker if BROKER_KIND == "plain" else BlockingRedisBroker
    broker = cls(url=url, namespace=unique("ns"), **kwargs)
    setup_broker(broker, config=config, set_global=False)
    return broker, config


def make_broker(redis_url: str) -> tuple[dramatiq.Broker, WebSocketRPCConfig]:
    """A broker of ``BROKER_KIND`` set up for rpc-tasks, replies on ``redis_url``. RabbitMQ
    brokers are remembered so :func:`close_rabbit_brokers` deletes their queues afterwards
    (tests give every actor a unique queue name)."""
    if BROKER_KIND != "rabbitmq":
        return redis_broker(redis_url)
    config = WebSocketRPCConfig(redis_url=redis_url, response_key_prefix=unique("test:resp") + ":")
    return _rabbit_broker(config), config


def twin_broker(broker: dramatiq.Broker, config: WebSocketRPCConfig) -> dramatiq.Broker:
    """A second broker on the same queues as ``broker`` (another process's view of them)."""
    if BROKER_KIND == "rabbitmq":
        return _rabbit_broker(config)
    twin = type(broker)(url=config.redis_url, namespace=broker.namespace)
    setup_broker(twin, config=config, set_global=False)
    return twin


def _rabbit_broker(config: WebSocketRPCConfig) -> dramatiq.Broker:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=AMQP_URL)
    setup_broker(broker, config=config, set_global=False)
    _rabbit_brokers.append(broker)
    return broker


def close_rabbit_brokers() -> None:
    """Delete the queues (with their delay and dead-letter queues) of the RabbitMQ brokers
    :func:`make_broker` built, and close them."""
    while _rabbit_brokers:
        broker = _rabbit_brokers.pop()
        delete_rabbit_queues(broker, *broker.get_declared_queues())
        with contextlib.suppress(Exception):
            broker.close()


def delete_rabbit_queues(broker: dramatiq.Broker, *queues: str) -> None:
    """Delete ``queues`` with their delay (``.DQ``) and dead-letter (``.XQ``) queues from a
    RabbitMQ broker, ignoring failures (a queue never declared, a closed channel)."""
    for queue in queues:
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            with contextlib.suppress(Exception):
                broker.channel.queue_delete(name)


def queue_size(broker: dramatiq.Broker, queue: str) -> int:
    """Messages waiting in ``queue`` (and its delay queue)."""
    if BROKER_KIND == "rabbitmq":
        ready, delayed, _ = broker.get_queue_message_counts(queue)
        return int(ready + delayed)
    return int(broker.do_qsize(queue))


def dead_letters(broker: dramatiq.Broker, queue: str) -> int:
    """Messages in ``queue``'s dead-letter queue."""
    if BROKER_KIND == "rabbitmq":
        return int(broker.get_queue_message_counts(queue)[2])
    return int(broker.client.zcard(f"{broker.namespace}:{queue}.XQ"))


def use_broker_kind(request: Any, monkeypatch: Any, kind: str) -> str:
    """Make :func:`make_broker` build ``kind`` brokers for one test (the ``broker_kind``
    fixtures call this); RabbitMQ needs the ``amqp_url`` fixture and cleans up after."""
    monkeypatch.setattr(sys.modules[__name__], "BROKER_KIND", kind)
    if kind == "rabbitmq":
        monkeypatch.setattr(sys.modules[__name__], "AMQP_URL", request.getfixturevalue("amqp_url"))
        request.addfinalizer(close_rabbit_brokers)
    return kind


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
    """A throw-away ``redis-server`` on a free port (for restart/AUTH tests, and whatever reads
    or changes server-wide state); with ``unix_socket=True`` it listens on a Unix socket
    instead of TCP (:meth:`unix_url`)."""

    def __init__(self, *extra: str, unix_socket: bool = False) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.server = server
        self.dir = tempfile.mkdtemp(prefix="rpc-tasks-test-redis-")
        self.socket_path = os.path.join(self.dir, "redis.sock") if unix_socket else None
        self.port = free_port()
        self.extra = list(extra)
        if self.socket_path is not None:
            self.extra = ["--unixsocket", self.socket_path, "--unixsocketperm", "700", *self.extra]
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
                if self.socket_path is not None:
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.settimeout(0.2)
                        sock.connect(self.socket_path)
                    return
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

    def unix_url(self, db: int = 0) -> str:
        assert self.socket_path is not None, "started without unix_socket=True"
        return f"unix://{self.socket_path}?db={db}"

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


def resp_end(buf: bytes, pos: int = 0) -> int | None:
    """Where the RESP reply starting at ``pos`` of ``buf`` ends; ``None`` if it is incomplete."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind, head = buf[pos : pos + 1], buf[pos + 1 : eol]
    if kind in (b"$", b"!", b"="):  # bulk strings
        size = int(head)
        end = eol + 2 if size < 0 else eol + 2 + size + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # aggregates
        count = int(head) * (2 if kind in (b"%", b"|") else 1)
        at: int | None = eol + 2
        for _ in range(max(count, 0)):
            at = resp_end(buf, at) if at is not None else None
        return at
    return eol + 2  # simple strings, errors, integers, nil, ...


class HalfOpenProxy:
    """A TCP proxy to ``127.0.0.1:upstream_port`` (in a thread of its own) that can make one
    connection go silent half-way through a pipelined write's replies: after :meth:`arm`, the
    first chunk from Redis that holds at least ``min_replies`` complete replies is forwarded up
    to the end of its first reply only; then that connection forwards nothing either way, its
    sockets left open (a half-open connection: no FIN, no RST). Other connections, and new
    ones, are forwarded as usual."""

    def __init__(self, upstream_port: int) -> None:
        import asyncio
        import threading

        self.upstream_port = upstream_port
        self.cuts = 0
        self._armed: int | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._silent: list[Any] = []
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def arm(self, min_replies: int) -> None:
        self._armed = min_replies

    def _run(self) -> None:
        import asyncio

        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._pipe, sock=self._sock)
        await self._server.serve_forever()

    async def _pipe(self, client_in: Any, client_out: Any) -> None:
        import asyncio

        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        silent = False

        async def upstream() -> None:
            while data := await client_in.read(65536):
                if not silent:
                    server_out.write(data)
            if not silent:
                server_out.close()

        async def downstream() -> None:
            nonlocal silent
            held = b""
            while data := await server_in.read(65536):
                if silent:
                    continue
                if self._armed is None:
                    client_out.write(data)
                    continue
                held += data
                ends: list[int] = []
                at: int | None = 0
                while at is not None and at < len(held):
                    at = resp_end(held, at)
                    if at is not None:
                        ends.append(at)
                if len(ends) >= self._armed:
                    self._armed, silent = None, True
                    self.cuts += 1
                    self._silent.append((client_out, server_out))  # keep the sockets open
                    client_out.write(held[: ends[0]])
                elif ends:
                    client_out.write(held[: ends[-1]])
                    held = held[ends[-1] :]
            if not silent:
                client_out.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._thread.join(5)
        for client_out, server_out in self._silent:
            client_out.transport.abort()
            server_out.transport.abort()
