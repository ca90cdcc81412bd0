"""``redis.asyncio`` connections for the async callers, and :class:`CommandPipe`.

The async callers never take a connection per call: each event loop keeps a reply reader's
connection and one :class:`CommandPipe` connection per Redis server, and every command (an
enqueue script, an ``XADD``, a ``PUBLISH``) goes through a pipe, which sends whatever
commands are waiting in one write and reads their replies in order (automatic pipelining).
So 10,000 concurrent calls share a couple of connections, and no command is packed or read
in a long stretch that would block the loop (a write carries at most :data:`MAX_BATCH`
commands).

Connections are described by a :class:`ConnectionSpec` (an async connection class and its
settings), taken from a redis-py client's pool or from a URL.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis
from redis.exceptions import RedisError

from ..config import redact_url
from ..exceptions import RPCConnectionError
from ..redis.connection import PLAIN_POOLS, pack
from .pacing import Pacer

#: Most commands sent in one write (their replies wake their callers in paced chunks, see
#: :mod:`rpc_tasks.aio.pacing`).
MAX_BATCH = 16
#: Seconds the replies of a write may take, in all, before the connection counts as lost (a
#: frozen server, or a connection gone silent half-way through the replies).
REPLY_TIMEOUT = 30.0
#: Seconds :func:`read_reply` reads again after its timeout, for data that arrived while the
#: event loop was blocked.
RECHECK_SECONDS = 0.05

#: Commands queued (or about to be) beyond which new calls wait for room before they build their
#: message (see :meth:`CommandPipe.wait_for_room`).
ROOM = 256

#: A Redis command: its name and arguments.
Command = tuple[Any, ...]

#: Settings a sync connection and its ``redis.asyncio`` twin share.
_PORTABLE = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "socket_connect_timeout",
        "socket_keepalive",
        "client_name",
        "encoding",
        "encoding_errors",
        "decode_responses",
        "protocol",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_check_hostname",
    }
)
_ASYNC_CLASSES: dict[type[Any], type[Any]] = {
    redis.Connection: aredis.Connection,
    redis.SSLConnection: aredis.SSLConnection,
    redis.UnixDomainSocketConnection: aredis.UnixDomainSocketConnection,
}


@dataclass(frozen=True)
class ConnectionSpec:
    """How to open a ``redis.asyncio`` connection to one Redis server and database."""

    connection_class: type[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def connect(self) -> Any:
        """A new (not yet connected) connection; it connects on its first command. It has no
        socket timeout (redis-py's default of 5 s would wrap every write in a task and every
        read in a timer): reads that may wait say how long themselves (see :func:`read_reply`)."""
        return self.connection_class(**{**self.kwargs, "socket_timeout": None})

    @classmethod
    def from_url(cls, url: str) -> ConnectionSpec:
        """From a ``redis://``, ``rediss://`` or ``unix://`` URL."""
        try:
            pool = aredis.ConnectionPool.from_url(url)
        except (ValueError, RedisError) as exc:
            raise RPCConnectionError(f"bad Redis URL {redact_url(url)!r}: {exc}") from None
        return cls(pool.connection_class, dict(pool.connection_kwargs))

    @classmethod
    def like(cls, client: redis.Redis) -> ConnectionSpec | None:
        """The async twin of a redis-py client's connections; ``None`` when its pool does not
        say which server it talks to (Sentinel, custom pools and connection classes)."""
        pool = client.connection_pool
        if type(pool) not in PLAIN_POOLS:
            return None
        async_class = _ASYNC_CLASSES.get(pool.connection_class)
        if async_class is None:
            return None
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _PORTABLE}
        return cls(async_class, kwargs)


def as_connection_error(what: str, exc: BaseException) -> RPCConnectionError:
    """The :class:`RPCConnectionError` for a failed ``what``."""
    return RPCConnectionError(f"{what}: {exc}")


class CommandPipe:
    """Commands of one event loop to one Redis server, pipelined on one connection.

    :meth:`submit` queues a command and returns a future of its reply (a ``ResponseError``
    reply becomes the future's exception; a connection failure fails every command of the
    write with the ``redis`` exception, since they may or may not have run). A flusher task
    runs while commands wait and ends when none are left. ``piggyback`` (if given) says
    whether another writer on the same server (the reply reader) will take the queue with
    :meth:`take` before its next write; then no flusher is started. ``pacer`` paces the
    wake-ups of the futures (see :func:`send_batch`).
    """

    def __init__(
        self,
        spec: ConnectionSpec,
        *,
        piggyback: Callable[[], bool] | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.spec = spec
        self.pacer = pacer or Pacer()
        self._piggyback = piggyback
        #: ``(build, argument, future)``: the command is ``build(argument)``, or ``argument``
        #: itself when ``build`` is ``None``.
        self._queue: list[tuple[Callable[[Any], Command] | None, Any, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        #: Calls waiting for room (first come, first admitted), and calls admitted that have
        #: not submitted their command yet: admissions are free places, never more than ROOM.
        self._room: deque[asyncio.Future[bool]] = deque()
        self._admitted = 0

    @property
    def crowded(self) -> bool:
        """Whether a new call should :meth:`wait_for_room` first."""
        return bool(self._room) or len(self._queue) + self._admitted >= ROOM

    async def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait until the queue has room for one more command (first come, first served);
        the caller then owes the pipe a :meth:`submit_deferred` (``admitted=True``) or a
        :meth:`pass_turn`. So 10,000 calls started at once do not all build (and hold) their
        messages before the first is sent: at most :data:`ROOM` are built ahead of the writes.
        ``timeout``: the most seconds to wait (commands ahead may never complete, e.g. on a
        frozen Redis); ``False`` when they passed first (not admitted: nothing owed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._room.append(future)
        if not self._queue and not self._admitted:  # nothing queued that would make room
            self._admit()
        timer = None if timeout is None or future.done() else loop.call_later(timeout, _give_up, future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():  # admitted, then cancelled
                self.pass_turn()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def pass_turn(self) -> None:
        """An admitted call will not submit after all: its place goes to the next caller."""
        self._admitted -= 1
        self._admit()

    def _admit(self) -> None:
        free = ROOM - len(self._queue) - self._admitted
        room = self._room
        while free > 0 and room:
            future = room.popleft()
            if not future.done():  # not cancelled, not timed out
                future.set_result(True)
                self._admitted += 1
                free -= 1

    def submit(self, command: Command) -> asyncio.Future[Any]:
        """Queue ``command``; the future gets its reply."""
        return self.submit_deferred(None, command)

    def submit_deferred(
        self, build: Callable[[Any], Command] | None, argument: Any, *, admitted: bool = False
    ) -> asyncio.Future[Any]:
        """Queue the command ``build(argument)``, built only when it is about to be sent (so a
        long queue holds no encoded commands); if ``build`` raises, the future gets the
        exception. The future gets the command's reply. ``admitted``: the caller waited for
        room (:meth:`wait_for_room`); its place becomes this command's."""
        if admitted:
            self._admitted -= 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((build, argument, future))
        self.kick()
        return future

    def kick(self) -> None:
        """Start the flusher if commands wait and nobody else will send them."""
        if self._task is None and self._queue and not (self._piggyback and self._piggyback()):
            self._task = asyncio.get_running_loop().create_task(self._flush())

    def take(self) -> list[tuple[Command, asyncio.Future[Any]]]:
        """Take up to :data:`MAX_BATCH` waiting commands (for a writer that sends them itself)."""
        taken, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch: list[tuple[Command, asyncio.Future[Any]]] = []
        for build, command, future in taken:
            if build is not None:
                try:
                    command = build(command)
                except Exception as exc:  # e.g. an option the encoder rejects
                    if not future.done():
                        future.set_exception(exc)
                    continue
            batch.append((command, future))
        if self._room:
            self._admit()
        return batch

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self.take()
                if self._conn is None:
                    self._conn = self.spec.connect()
                try:
                    await send_batch(self._conn, batch, pacer=self.pacer)
                except (RedisError, OSError):
                    continue  # the batch's futures carry the error; the next write reconnects
        finally:
            self._task = None
            self.kick()  # anything queued after the last take

    async def aclose(self) -> None:
        """Close the connection (a new one is opened on the next command)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()


def _give_up(future: asyncio.Future[bool]) -> None:
    """A wait for room timed out: the caller is not admitted (``_admit`` skips its future)."""
    if not future.done():
        future.set_result(False)


async def read_reply(conn: Any, timeout: float) -> Any:
    """The next reply on ``conn``, waiting up to ``timeout`` seconds (then the connection is
    dropped and ``redis.TimeoutError`` raised). A nil reply is ``None``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await conn.read_response(timeout=timeout)
    # redis-py returns None both for a nil reply and when its read timed out: tell them apart.
    if reply is None and loop.time() - started >= timeout * 0.99:
        # After the loop was blocked for longer than the timeout (a coroutine calling
        # time.sleep), the timer fires in the same loop step as the data that arrived meanwhile,
        # and wins: look at what is there before the connection counts as lost (redis-py's
        # reads are cancel-safe: a read cut short by its timeout leaves the data buffered).
        again = loop.time()
        reply = await conn.read_response(timeout=RECHECK_SECONDS)
        if reply is None and loop.time() - again >= RECHECK_SECONDS * 0.99:
            await conn.disconnect(nowait=True)
            raise redis.TimeoutError(f"no reply from Redis within {timeout:.1f}s")
    return reply


async def send_batch(
    conn: Any,
    batch: list[tuple[Command, asyncio.Future[Any]]],
    tail: tuple[Command, ...] = (),
    *,
    pacer: Pacer | None = None,
) -> None:
    """Write ``batch`` (and ``tail``, whose replies the caller reads) in one write and resolve
    the batch's futures from their replies in order; with a ``pacer``, yield to the loop when
    its chunk is full (the woken callers run before the next ones are woken)."""
    commands = [command for command, _ in batch] + list(tail)
    # One timer for the whole write (a timer per reply would cost more than the read): if the
    # replies are not all in within REPLY_TIMEOUT, the connection is dropped, which fails the
    # read waiting on it. Without it, a connection gone silent after the first reply (half-open)
    # would hold this writer, and every command queued behind it, forever.
    watchdog = _Watchdog(conn)
    timer = asyncio.get_running_loop().call_later(REPLY_TIMEOUT, watchdog.fire)
    try:
        # The hot paths' RESP packer (redis-py's pure-Python one costs ~10x more per command).
        await conn.send_packed_command(pack(conn, commands), check_health=False)
        del commands
        for _, future in batch:
            if pacer is not None and pacer.full:
                await pacer.pause()
            try:
                reply = await conn.read_response()
            except redis.ResponseError as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                if pacer is not None:
                    pacer.wake()
                future.set_result(reply)
    except (RedisError, OSError) as exc:
        failure: BaseException = exc
        if watchdog.fired:
            failure = redis.TimeoutError(f"no reply from Redis within {REPLY_TIMEOUT:.1f}s")
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
        if failure is exc:
            raise
        raise failure from exc
    except BaseException:
        error = redis.ConnectionError("the connection was closed while sending")
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
        raise
    finally:
        timer.cancel()


class _Watchdog:
    """Drops a connection whose replies are late (see :func:`send_batch`): closing it fails the
    read waiting on it with a ``redis`` error; the next command reconnects."""

    __slots__ = ("_closing", "conn", "fired")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.fired = False
        self._closing: asyncio.Task[None] | None = None  # held: a task nobody holds may vanish

    def fire(self) -> None:
        self.fired = True
        self._closing = asyncio.get_running_loop().create_task(self.conn.disconnect(nowait=True))


#: Per event loop: the readers and pipes of that loop, by what they serve.
_per_loop: dict[asyncio.AbstractEventLoop, dict[object, Any]] = {}
_per_loop_lock = threading.Lock()


def loop_local(key: object, factory: Callable[[], Any]) -> Any:
    """The running loop's object for ``key`` (built by ``factory`` on first use). Entries of
    closed loops are dropped when a new loop shows up."""
    loop = asyncio.get_running_loop()
    table = _per_loop.get(loop)
    if table is None:
        with _per_loop_lock:  # loops of other threads may register at the same time
            for old in [other for other in _per_loop if other.is_closed()]:
                del _per_loop[old]
            table = _per_loop.setdefault(loop, {})
    value = table.get(key)
    if value is None:
        value = table[key] = factory()
    return value


def loop_local_peek(key: object) -> Any:
    """The running loop's object for ``key`` if :func:`loop_local` built one, else ``None``."""
    table = _per_loop.get(asyncio.get_running_loop())
    return None if table is None else table.get(key)


async def aclose_loop_connections() -> None:
    """Close the running loop's reply readers and command pipes (their connections). Calls
    still waiting fail with :class:`RPCConnectionError`; the next call opens new ones. Call it
    before the loop ends (e.g. at the end of ``asyncio.run``'s main) to close the sockets
    cleanly."""
    table = _per_loop.pop(asyncio.get_running_loop(), {})
    closed: set[int] = set()
    for value in table.values():
        if id(value) not in closed and callable(getattr(value, "aclose", None)):
            closed.add(id(value))
            await value.aclose()
