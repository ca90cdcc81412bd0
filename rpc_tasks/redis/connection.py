"""Redis connections for the hot paths: pools, kept (pinned) connections, lean pipelines.

Every feature's Redis module builds on this one: :func:`make_redis` and
:func:`client_from_config` make clients on a *blocking* pool; :func:`pipelined` sends several
commands in one write on one connection (the hot paths' round trips) and
:func:`blocking_command` one command that blocks on the server, both waited for with their own
timeout whatever the client's ``socket_timeout``. Long-lived threads (a worker's consumer and
worker threads, the Streams server's readers) keep one connection each
(:func:`thread_connection`), given back when the thread ends.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import weakref
from typing import Any, cast

import redis
from redis.exceptions import RedisError

from ..config import WebSocketRPCConfig, redact_url
from ..exceptions import RPCConnectionError
from . import topology

logger = logging.getLogger(__name__)

#: Smallest wait (BLPOP 0 would block forever).
MIN_BLOCK_SECONDS = 0.001
#: Extra time given to the server-side BLPOP timeout; the client enforces the real deadline.
SERVER_SLACK_SECONDS = 0.5
#: How long a raw command on a Redis Cluster follows a moving slot (``ASK``) before giving up.
CLUSTER_REDIRECT_SECONDS = 10.0


def make_redis(
    url: str,
    *,
    max_connections: int = 50,
    pool_timeout: float = 10.0,
    **kwargs: Any,
) -> redis.Redis:
    """A redis-py client on a *blocking* pool (a :class:`DeadlinePool`): when all
    ``max_connections`` are busy, callers wait up to ``pool_timeout`` seconds for one (a
    ``.call()`` no longer than its deadline) instead of failing with "Too many connections".
    Works with ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, with AUTH in the URL, and
    with the Sentinel and Cluster forms of :mod:`rpc_tasks.redis.topology`.
    """
    if topology.is_topology_url(url):  # scale-out (issue 18): Sentinel master or Cluster client
        return cast(redis.Redis, topology.sync_client(url, max_connections=max_connections, **kwargs))
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": pool_timeout,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
    }
    if not url.startswith("unix://"):  # a Unix socket connection takes no TCP keepalive option
        options["socket_keepalive"] = True
    options.update(kwargs)
    try:
        pool = DeadlinePool.from_url(url, **options)
    except (ValueError, RedisError) as exc:
        raise RPCConnectionError(f"bad Redis URL {redact_url(url)!r}: {exc}") from None
    return redis.Redis(connection_pool=pool)


class DeadlinePool(redis.BlockingConnectionPool):
    """redis-py's ``BlockingConnectionPool`` whose wait for a free connection can be cut short
    per checkout (:func:`checkout`): a ``.call()`` never waits for a connection past its own
    deadline, whatever ``pool_timeout`` says."""

    _override = threading.local()

    @property
    def timeout(self) -> float | None:
        override: float | None = getattr(DeadlinePool._override, "timeout", None)
        return self._default_timeout if override is None else override

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._default_timeout = value


def checkout(pool: Any, timeout: float) -> Any:
    """A connection of ``pool``, waiting at most ``timeout`` seconds for a free one when the
    pool is a :class:`DeadlinePool` (other pools wait as they were configured to); raises
    ``redis.ConnectionError`` when none is free in time."""
    if not isinstance(pool, DeadlinePool):
        return pool.get_connection()
    own = pool._default_timeout
    DeadlinePool._override.timeout = max(0.0, min(timeout, own if own is not None else timeout))
    try:
        return cast(Any, pool).get_connection()
    finally:
        DeadlinePool._override.timeout = None


def client_from_config(config: WebSocketRPCConfig) -> redis.Redis:
    """The reply-path Redis client described by ``config``."""
    return make_redis(
        config.redis_url,
        max_connections=config.redis_max_connections,
        pool_timeout=config.redis_pool_timeout,
    )


_PLAIN_CONNECTIONS = (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)


#: Pool and connection classes whose ``connection_kwargs`` name the server they talk to.
#: Other pools (e.g. Sentinel's, which discovers its server) never count as "the same Redis".
#: Pools whose connection settings name the one server they talk to (not Sentinel, not custom).
PLAIN_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool, DeadlinePool)
_PLAIN_POOLS = PLAIN_POOLS


def same_redis(a: redis.Redis, b: redis.Redis) -> bool:
    """True when two clients talk to the same Redis server and database (same host/port or
    socket path, same db, same user, same connection class). Conservative: pools whose server
    is not fixed in their settings (Sentinel, custom pools) are only "the same" when they are
    the same pool object; ``localhost`` and ``127.0.0.1`` count as different."""
    pa, pb = a.connection_pool, b.connection_pool
    if a is b or pa is pb:
        return True
    for pool in (pa, pb):
        if type(pool) not in _PLAIN_POOLS or pool.connection_class not in _PLAIN_CONNECTIONS:
            return False
    fields = ("host", "port", "path", "db", "username")
    ka, kb = pa.connection_kwargs, pb.connection_kwargs
    return pa.connection_class is pb.connection_class and all(ka.get(f) == kb.get(f) for f in fields)


_pinned = threading.local()
#: Bumped in a forked child, so that it never uses its parent's pinned connections.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ThreadPins:
    """One thread's kept connections (pool -> connection, weakly keyed by the pool). They go
    back to their pools when the thread ends (its thread-local state is dropped) or on
    :func:`release_thread_connections`; a forked child never hands back its parent's (in a
    child, the parent's other threads' state is dropped during the fork itself, before any
    at-fork hook ran: hence the pid check)."""

    __slots__ = ("generation", "pid", "table")

    def __init__(self) -> None:
        self.generation = _fork_generation
        self.pid = os.getpid()
        self.table: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def release(self) -> None:
        table, self.table = self.table, weakref.WeakKeyDictionary()
        if self.pid != os.getpid() or self.generation != _fork_generation:
            return  # the parent process's connections: not ours to give back
        for pool, conn in list(table.items()):
            try:
                pool.release(conn)
            except Exception:  # pragma: no cover - best effort (e.g. at interpreter exit)
                logger.debug("could not return a kept connection to its pool", exc_info=True)

    def __del__(self) -> None:
        self.release()


def _thread_pins() -> _ThreadPins:
    pins: _ThreadPins | None = getattr(_pinned, "pins", None)
    if pins is None or pins.generation != _fork_generation:
        pins = _pinned.pins = _ThreadPins()
    return pins


def thread_connection(client: redis.Redis) -> Any:
    """This thread's own connection of ``client``'s pool, taken once and kept (no pool
    checkout per command: its health check costs syscalls). For long-lived threads with one
    job, such as a worker's consumer and worker threads; the connection goes back to the pool
    when the thread ends. Keyed by the pool object itself (weakly: a pool that is gone takes
    its entry with it), renewed after a fork."""
    pool = client.connection_pool
    conn = _thread_pins().table.get(pool)
    if conn is None:
        # No reference to the pins object is held across the checkout: an exception here must
        # not tie it into a reference cycle (freed later by the GC, it could lose its entries).
        conn = pool.get_connection()
        _thread_pins().table[pool] = conn
    return conn


def _unpin(client: redis.Redis, conn: Any) -> None:
    """Give this thread's kept connection of ``client``'s pool back (it takes a new one next)."""
    pool = client.connection_pool
    if _thread_pins().table.pop(pool, None) is conn:
        pool.release(conn)


def release_thread_connections() -> None:
    """Give the calling thread's kept connections (see :func:`thread_connection`) back to
    their pools now, e.g. before a thread that used them goes idle in a thread pool."""
    pins: _ThreadPins | None = getattr(_pinned, "pins", None)
    if pins is not None:
        pins.release()


_HIREDIS = bool(getattr(redis.utils, "HIREDIS_AVAILABLE", False))
#: Arguments at least this long are sent as their own buffer, not copied into the packet.
_BIG_ARG = 16_384


def pack(conn: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """RESP-encode ``commands`` for ``conn.send_packed_command``: the same bytes as
    ``conn.pack_commands``, in a fraction of the time of redis-py's pure-Python packer (the hot
    paths send 10-20 arguments per call). Falls back to redis-py for hiredis's C packer, a
    non-UTF-8 encoder or an argument type other than bytes/str/int/float."""
    encoder = getattr(conn, "encoder", None)
    if _HIREDIS or encoder is None or encoder.encoding.lower() not in ("utf-8", "utf8"):
        return list(conn.pack_commands(commands))
    out: list[bytes] = []
    parts: list[bytes] = []
    for command in commands:
        if " " in str(command[0]):  # "CONFIG GET" style: redis-py splits the name
            return list(conn.pack_commands(commands))
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode("utf-8", encoder.encoding_errors)
            elif kind is int:
                data = b"%d" % arg
            elif kind is float:
                data = repr(arg).encode()
            else:
                return list(conn.pack_commands(commands))
            if len(data) >= _BIG_ARG:
                parts.append(b"$%d\r\n" % len(data))
                out.append(b"".join(parts))
                out.append(data)
                parts = [b"\r\n"]
            else:
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    out.append(b"".join(parts))
    return out


_READ_TAKES_TIMEOUT: dict[type, bool] = {}


def _read_takes_timeout(conn: Any) -> bool:
    """Whether this redis-py connection class's ``read_response`` accepts ``timeout=``."""
    cls = type(conn)
    known = _READ_TAKES_TIMEOUT.get(cls)
    if known is None:
        try:
            known = "timeout" in inspect.signature(cls.read_response).parameters
        except (TypeError, ValueError):  # pragma: no cover - not introspectable
            known = False
        _READ_TAKES_TIMEOUT[cls] = known
    return known


def _read_blocking_reply(conn: Any, wait: float | None) -> Any:
    """Read the reply of a command that blocks on the server for up to ``wait`` seconds, with
    some slack, whatever the client's ``socket_timeout`` (which would otherwise cut every long
    block short, or, when it is ``None``, let a half-open connection hang the reader forever):
    no reply by then raises ``redis.TimeoutError``. With a socket timeout at least that long
    it is a plain read (no extra syscalls), bounded by that timeout."""
    if wait is None:
        return conn.read_response()
    limit = wait + SERVER_SLACK_SECONDS
    socket_timeout = getattr(conn, "socket_timeout", None)
    if socket_timeout is not None and socket_timeout >= limit:
        return conn.read_response()
    if _read_takes_timeout(conn):  # redis-py 8: the whole reply is read with that timeout
        return conn.read_response(timeout=limit)
    if not wait_readable(conn, time.monotonic() + limit):  # older redis-py: the first bytes
        conn.disconnect()  # the reply may still come: never reuse this connection
        raise redis.TimeoutError(f"no reply from Redis within {limit:.3f}s")
    return conn.read_response()


def _ensure_fresh(conn: Any) -> bool:
    """Drop ``conn``'s socket if it is already readable before anything was sent on it: the
    server closed it (a restart, an idle timeout, ``CLIENT KILL``) or it holds stray bytes.
    The next send then reconnects. This is what makes a replay unnecessary: a command is sent
    once, on a connection that was alive a moment before. True when it was dropped."""
    if getattr(conn, "_sock", None) is None:
        return False
    try:
        stale = conn.can_read(timeout=0)
    except (redis.ConnectionError, OSError):
        stale = True
    if stale:
        conn.disconnect()
    return bool(stale)


def pipelined(
    client: redis.Redis,
    commands: list[tuple[Any, ...]],
    *,
    pinned: bool = False,
    wait: float | None = None,
) -> list[Any]:
    """Send ``commands`` in one write on one connection and read every reply: a lean
    non-transactional pipeline (no per-command objects), for the hot paths. A blocking command
    may come first (give its server-side timeout as ``wait``); the ones after it run when it
    returns. An error reply is raised after all replies were read (the connection stays
    usable). ``pinned``: use this thread's own connection (see :func:`thread_connection`)
    instead of the pool. On a Redis Cluster client: on the node owning the first command's key,
    following moved slots.

    Commands are never replayed: a connection error after the write may come after the server
    ran them (a reset after the reply), and the hot paths' commands (an enqueue, an ack with
    its reply, a fetch) must not run twice. Instead a connection the server already closed (a
    restart, ``CLIENT KILL``) is detected before the write (its socket is readable) and
    replaced, so a stale kept connection costs no error; any other connection error is raised
    (as ``redis.ConnectionError``) for the caller to handle. A kept connection that failed goes
    back to the pool: the next checkout from a Sentinel pool asks where the master is now (a
    reconnect on send would not)."""
    if topology.is_cluster(client):  # scale-out (issue 18): route, then the plain path below
        key = topology.slot_key(client, commands[0]) or ""
        deadline = time.monotonic() + (wait or 0.0) + CLUSTER_REDIRECT_SECONDS
        return topology.on_cluster_node(
            client, key, lambda node: pipelined(node, commands, pinned=pinned, wait=wait), deadline
        )
    pool = client.connection_pool
    conn: Any = thread_connection(client) if pinned else pool.get_connection()
    replies: list[Any] = []
    try:
        if pinned and _ensure_fresh(conn):  # pool checkouts run the same check themselves
            _unpin(client, conn)
            conn = thread_connection(client)
        conn.send_packed_command(pack(conn, commands))
        for index in range(len(commands)):
            try:
                replies.append(_read_blocking_reply(conn, wait) if index == 0 else conn.read_response())
            except redis.ResponseError as exc:  # fully read: the connection stays usable
                replies.append(exc)
    except BaseException as exc:
        conn.disconnect()
        if pinned and isinstance(exc, redis.ConnectionError):
            _unpin(client, conn)
        raise
    finally:
        if not pinned:
            pool.release(conn)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return replies


def blocking_command(client: redis.Redis, *args: Any, wait: float, pinned: bool = False) -> Any:
    """One command that blocks on the server for up to ``wait`` seconds (e.g. ``XREADGROUP
    ... BLOCK``), sent with :func:`pipelined` (so waited for whatever the client's
    ``socket_timeout``, never replayed); its reply parsed by
    ``client``'s response callback for the command, as ``client.execute_command`` parses it
    without options. ``pinned``: on this thread's own connection."""
    response = pipelined(client, [args], pinned=pinned, wait=wait)[0]
    parser = topology.node_client(client, "")  # a cluster's nodes parse as a plain client (issue 18)
    callback = cast(Any, parser).response_callbacks.get(str(args[0]).upper())
    return callback(response) if callback is not None else response


def wait_readable(conn: Any, deadline: float) -> bool:
    """Wait until ``conn`` has a reply or ``deadline`` (monotonic) passes; a readiness check
    that returns early (a spurious wake-up) is simply retried with the time left."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if conn.can_read(timeout=remaining):
            return True
