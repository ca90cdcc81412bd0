"""All Redis I/O of the reply path in one place: connection pools and reply lists.

``ReplyChannel.push`` writes a reply and its TTL atomically (``MULTI``/``LPUSH``/``EXPIRE``/
``EXEC``), so a reply key never exists without a TTL. ``ReplyChannel.wait`` pops the reply with
``BLPOP`` (float timeout, millisecond precision) and deletes the key in the same round trip.
Every redis-py exception is turned into :class:`~rpc_tasks.exceptions.RPCConnectionError`.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.exceptions import RedisError

from . import protocol as _protocol
from .config import WebSocketRPCConfig, redact_url
from .exceptions import RPCConnectionError
from .protocol import reply_key

logger = logging.getLogger("rpc_tasks.redis")

#: Smallest wait (BLPOP 0 would block forever).
MIN_BLOCK_SECONDS = 0.001
#: Extra time given to the server-side BLPOP timeout; the client enforces the real deadline.
SERVER_SLACK_SECONDS = 0.5


def make_redis(
    url: str,
    *,
    max_connections: int = 50,
    pool_timeout: float = 10.0,
    **kwargs: Any,
) -> redis.Redis:
    """A redis-py client on a *blocking* pool: when all ``max_connections`` are busy, callers
    wait up to ``pool_timeout`` seconds for one instead of failing with "Too many connections".
    Works with ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, with AUTH in the URL.
    """
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": pool_timeout,
        "socket_keepalive": True,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
    }
    options.update(kwargs)
    try:
        pool = redis.BlockingConnectionPool.from_url(url, **options)
    except (ValueError, RedisError) as exc:
        raise RPCConnectionError(f"bad Redis URL {redact_url(url)!r}: {exc}") from None
    return redis.Redis(connection_pool=pool)


def client_from_config(config: WebSocketRPCConfig) -> redis.Redis:
    """The reply-path Redis client described by ``config``."""
    return make_redis(
        config.redis_url,
        max_connections=config.redis_max_connections,
        pool_timeout=config.redis_pool_timeout,
    )


#: Pool and connection classes whose ``connection_kwargs`` name the server they talk to.
#: Other pools (e.g. Sentinel's, which discovers its server) never count as "the same Redis".
_PLAIN_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)
_PLAIN_CONNECTIONS = (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)


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


def _thread_connection(client: redis.Redis) -> Any:
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


def release_thread_connections() -> None:
    """Give the calling thread's kept connections (see :func:`_thread_connection`) back to
    their pools now, e.g. before a thread that used them goes idle in a thread pool."""
    pins: _ThreadPins | None = getattr(_pinned, "pins", None)
    if pins is not None:
        pins.release()


_HIREDIS = bool(getattr(redis.utils, "HIREDIS_AVAILABLE", False))
#: Arguments at least this long are sent as their own buffer, not copied into the packet.
_BIG_ARG = 16_384


def _pack(conn: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
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
    block short): no reply by then raises ``redis.TimeoutError``. Without a socket timeout that
    short it is a plain read (no extra syscalls)."""
    if wait is None:
        return conn.read_response()
    limit = wait + SERVER_SLACK_SECONDS
    socket_timeout = getattr(conn, "socket_timeout", None)
    if socket_timeout is None or socket_timeout >= limit:
        return conn.read_response()
    if _read_takes_timeout(conn):  # redis-py 8: the whole reply is read with that timeout
        return conn.read_response(timeout=limit)
    if not _wait_readable(conn, time.monotonic() + limit):  # older redis-py: the first bytes
        raise redis.TimeoutError(f"no reply from Redis within {limit:.3f}s")
    return conn.read_response()


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
    usable). A connection error is retried once on a fresh connection (a pooled connection may
    be stale after a Redis restart); a timeout is not (the commands may have run). ``pinned``:
    use this thread's own connection (see :func:`_thread_connection`) instead of the pool."""
    pool = client.connection_pool
    for attempt in (1, 2):
        conn: Any = _thread_connection(client) if pinned else pool.get_connection()
        replies: list[Any] = []
        try:
            conn.send_packed_command(_pack(conn, commands))
            for index in range(len(commands)):
                try:
                    replies.append(_read_blocking_reply(conn, wait) if index == 0 else conn.read_response())
                except redis.ResponseError as exc:  # fully read: the connection stays usable
                    replies.append(exc)
        except redis.ConnectionError:
            conn.disconnect()  # a pinned connection reconnects on its next send
            if attempt == 2:
                raise
            continue
        except BaseException:
            conn.disconnect()
            raise
        finally:
            if not pinned:
                pool.release(conn)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies
    raise AssertionError("unreachable")  # pragma: no cover


def blocking_command(client: redis.Redis, *args: Any, wait: float, pinned: bool = False) -> Any:
    """One command that blocks on the server for up to ``wait`` seconds (e.g. ``XREADGROUP
    ... BLOCK``), sent with :func:`pipelined` (so waited for whatever the client's
    ``socket_timeout``, a connection error retried once, a timeout not); its reply parsed by
    ``client``'s response callback for the command, as ``client.execute_command`` parses it
    without options. ``pinned``: on this thread's own connection."""
    response = pipelined(client, [args], pinned=pinned, wait=wait)[0]
    callback = cast(Any, client).response_callbacks.get(str(args[0]).upper())
    return callback(response) if callback is not None else response


def _wait_readable(conn: Any, deadline: float) -> bool:
    """Wait until ``conn`` has a reply or ``deadline`` (monotonic) passes; a readiness check
    that returns early (a spurious wake-up) is simply retried with the time left."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if conn.can_read(timeout=remaining):
            return True


def queue_reply(pipe: Any, key: str, payload: bytes, ttl: int) -> None:
    """Add a reply (``LPUSH`` + ``EXPIRE``) to a ``MULTI`` pipeline."""
    pipe.lpush(key, payload)
    pipe.expire(key, ttl)


class ReplyChannel:
    """Reply lists in Redis: key naming, atomic push with TTL, blocking pop."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "list:response:",
        ttl: int = 60,
        max_bytes: int = 1_048_576,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, config: WebSocketRPCConfig, client: redis.Redis | None = None) -> ReplyChannel:
        """Build from a config (creating the client unless one is given)."""
        return cls(
            client or client_from_config(config),
            prefix=config.response_key_prefix,
            ttl=config.response_key_ttl,
            max_bytes=config.max_payload_bytes,
        )

    def key_for(self, correlation_id: str) -> str:
        """Reply key for ``correlation_id``."""
        return reply_key(self.prefix, correlation_id)

    def push(self, key: str, payload: bytes) -> None:
        """``LPUSH`` + ``EXPIRE`` in one transaction (never a key without a TTL)."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                queue_reply(pipe, key, payload, self.ttl)
                pipe.execute()
        except RedisError as exc:
            raise RPCConnectionError(f"could not push reply to Redis: {exc}") from exc

    def wait(
        self,
        key: str,
        timeout: float,
        *,
        first: tuple[Any, ...] | None = None,
        on_first: Callable[[Any], None] | None = None,
    ) -> bytes | None:
        """Block up to ``timeout`` seconds for the reply on ``key``; ``None`` on timeout.

        Redis only checks blocking timeouts every ``1/hz`` seconds (100 ms by default), so the
        deadline is enforced on the client side with millisecond precision: ``BLPOP`` is sent
        with a little slack and, if nothing is readable by the deadline, the connection is
        dropped (which also cancels the pending ``BLPOP`` on the server). ``DEL key`` is
        pipelined behind the ``BLPOP`` so a duplicate reply (e.g. after a redelivery) does not
        linger, at no extra round trip.

        ``first`` is one command (e.g. the enqueue of the request) sent ahead of the ``BLPOP``
        in the same write, so sending the request and waiting for its reply cost one round
        trip; ``on_first`` gets its reply as soon as it arrives (even if that is a little after
        the deadline). If that command fails, its ``ResponseError`` is raised and nothing is
        waited for.
        """
        responses = self._blocking_pop(key, timeout, ("DEL", key), first, on_first)
        if responses is None or not responses[0]:
            return None
        value = responses[0][1]
        return value if isinstance(value, bytes) else str(value).encode()

    def wait_many(self, key: str, timeout: float, most: int) -> list[bytes]:
        """Block up to ``timeout`` s for at least one reply on ``key``, then take up to ``most``
        in the same round trip (``BLPOP`` + ``LPOP key count``). Empty list on timeout."""
        responses = self._blocking_pop(key, timeout, ("LPOP", key, most - 1) if most > 1 else None)
        if responses is None:
            return []
        popped, rest = responses[0], (responses[1] if len(responses) > 1 else None)
        return ([popped[1]] if popped else []) + list(rest or [])

    def _blocking_pop(
        self,
        key: str,
        timeout: float,
        follow_up: tuple[Any, ...] | None,
        first: tuple[Any, ...] | None = None,
        on_first: Callable[[Any], None] | None = None,
    ) -> list[Any] | None:
        """``BLPOP key`` (plus one pipelined follow-up command, and optionally one command
        ahead of it) with a client-side deadline; the ``BLPOP`` and follow-up responses, or
        ``None`` when the deadline passed first."""
        wait_for = max(float(timeout), MIN_BLOCK_SECONDS)
        deadline = time.monotonic() + wait_for
        commands: list[tuple[Any, ...]] = [("BLPOP", key, round(wait_for + SERVER_SLACK_SECONDS, 3))]
        if first is not None:
            commands.insert(0, first)
        if follow_up is not None:
            commands.append(follow_up)
        pool = self.client.connection_pool
        try:
            conn: Any = pool.get_connection()
        except RedisError as exc:
            raise RPCConnectionError(f"no Redis connection for the reply: {exc}") from exc
        failed_first: BaseException | None = None
        try:
            conn.send_packed_command(_pack(conn, commands))
            if first is not None:
                # The outcome of ``first`` (e.g. "enqueued") is read even when the deadline
                # passes before it (a very short timeout), so that ``on_first`` still runs.
                if not _wait_readable(conn, deadline + SERVER_SLACK_SECONDS):
                    conn.disconnect()
                    return None
                try:
                    first_reply = conn.read_response()
                except redis.ResponseError as exc:
                    conn.disconnect()  # cancels the BLPOP queued behind the failed command
                    failed_first = exc
                    raise
                if on_first is not None:
                    on_first(first_reply)
                commands = commands[1:]
            if not _wait_readable(conn, deadline):
                conn.disconnect()  # cancels the pending BLPOP; the pool reconnects on next use
                return None
            return [conn.read_response() for _ in commands]
        except (RedisError, OSError) as exc:
            if exc is failed_first:
                raise

            conn.disconnect()
            raise RPCConnectionError(f"lost Redis while waiting for a reply: {exc}") from exc
        except BaseException:
            # e.g. Dramatiq's TimeLimitExceeded raised into a caller mid-wait: never give the
            # pool a connection with replies still in flight.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def discard(self, key: str) -> None:
        """Delete a reply key (best effort, e.g. after a caller gave up)."""
        try:
            self.client.delete(key)
        except RedisError:  # pragma: no cover - best effort
            logger.debug("could not delete reply key", exc_info=True)

    def ping(self) -> bool:
        """True when Redis answers ``PING``."""
        try:
            return bool(self.client.ping())
        except RedisError:
            return False


# -- shared rate-limit state --------------------------------------------------------------------

# Open (or extend, never shorten) a cooldown: the key's PTTL is the time left. Announces the
# result on ARGV[3] so that workers keep a local view instead of asking Redis per message.
_OPEN_COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', want)
  left = want
end
redis.call('PUBLISH', ARGV[3], KEYS[1] .. '|' .. left)
return left
"""

# Fleet-wide proactive limit: GCRA with no burst (admitted events are at least `interval` ms
# apart, in Redis server time) plus a reservation line so that waiting messages get distinct
# future slots instead of all retrying at once. Returns {delay_ms, reserved}: delay 0 means
# "admitted, run now"; otherwise come back after delay_ms (reserved = 1 if a slot was taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local has_slot = tonumber(ARGV[2]) == 1
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local rtat = tonumber(redis.call('GET', KEYS[2]) or '0')
if now >= tat and (has_slot or now >= rtat) then
  redis.call('SET', KEYS[1], tostring(now + interval), 'PX', math.ceil(interval) + 60000)
  return {0, 0}
end
if has_slot then
  return {math.max(1, math.ceil(tat - now)), 1}
end
local slot = math.max(rtat, tat, now)
redis.call('SET', KEYS[2], tostring(slot + interval), 'PX', math.ceil(slot + interval - now) + 60000)
return {math.max(1, math.ceil(slot - now)), 1}
"""


class RateStore:
    """Shared cooldowns and proactive rate limits in Redis (server time, so worker clocks
    do not matter)."""

    def __init__(self, client: redis.Redis, events_channel: str = "rpc_tasks:rate:events") -> None:
        self.client = client
        self.events_channel = events_channel
        self._open = client.register_script(_OPEN_COOLDOWN)
        self._acquire = client.register_script(_ACQUIRE)
        self._view: dict[str, float] = {}
        self._view_ready = threading.Event()
        self._view_thread: threading.Thread | None = None
        self._view_pid = 0
        self._view_lock = threading.Lock()

    def open_cooldown(self, key: str, duration_ms: int, reason: str = "") -> int:
        """Open or extend the cooldown ``key`` to at least ``duration_ms``; returns ms left.
        Every process watching (:meth:`cooldown_left_fast`) learns of it over Pub/Sub."""
        try:
            return int(
                self._open(keys=[key], args=[max(1, int(duration_ms)), reason or "1", self.events_channel])
            )
        except RedisError as exc:
            raise RPCConnectionError(f"could not open a cooldown: {exc}") from exc

    # -- local view of open cooldowns --------------------------------------------------------

    def cooldown_left_fast(self, key: str) -> int:
        """Like :meth:`cooldown_left`, answered from a local view kept current over Pub/Sub
        (no round trip per message); falls back to ``PTTL`` while the view is not connected."""
        self._ensure_view()
        if not self._view_ready.is_set():
            return self.cooldown_left(key)
        until = self._view.get(key)
        if until is None:
            return 0
        left = int((until - time.monotonic()) * 1000)
        if left <= 0:
            self._view.pop(key, None)
            return 0
        return left

    def _ensure_view(self) -> None:
        if self._view_thread is not None and self._view_pid == os.getpid() and self._view_thread.is_alive():
            return
        with self._view_lock:
            if self._view_thread is None or self._view_pid != os.getpid() or not self._view_thread.is_alive():
                self._view_ready.clear()
                self._view_pid = os.getpid()
                self._view_thread = threading.Thread(target=self._watch, name="rpc-cooldowns", daemon=True)
                self._view_thread.start()

    def _watch(self) -> None:
        backoff = 0.1
        while True:
            pubsub: Any = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.events_channel)
                prefix = self.events_channel.rsplit(":", 1)[0]
                fresh: dict[str, float] = {}
                for raw in self.client.scan_iter(match=f"{prefix}:cooldown:*", count=500):
                    name = raw.decode() if isinstance(raw, bytes) else str(raw)
                    left = int(self.client.pttl(name))
                    if left > 0:
                        fresh[name] = time.monotonic() + left / 1000.0
                self._view = fresh
                self._view_ready.set()
                backoff = 0.1
                # Wait in slices shorter than the client's socket timeout (if it has one).
                socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
                wait = min(1.0, float(socket_timeout) / 2) if socket_timeout else 1.0
                while True:
                    message = pubsub.get_message(timeout=wait)
                    if message is None or message.get("type") != "message":
                        continue
                    data = (
                        message["data"].decode()
                        if isinstance(message["data"], bytes)
                        else str(message["data"])
                    )
                    name, _, left_ms = data.rpartition("|")
                    until = time.monotonic() + int(left_ms) / 1000.0
                    if until > self._view.get(name, 0.0):
                        self._view[name] = until
            except (RedisError, ValueError, OSError):
                logger.warning("cooldown watcher lost Redis; asking Redis per message until it is back")
            finally:
                self._view_ready.clear()
                try:
                    pubsub.close()
                except Exception:  # pragma: no cover
                    pass
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def cooldown_left(self, key: str) -> int:
        """Milliseconds left on cooldown ``key`` (0 when none is open)."""
        try:
            left = int(self.client.pttl(key))
        except RedisError as exc:
            raise RPCConnectionError(f"could not read a cooldown: {exc}") from exc
        return left if left > 0 else 0

    def acquire(self, keys: tuple[str, str], interval_ms: float, has_slot: bool) -> tuple[int, bool]:
        """Ask the proactive limiter for permission: ``(0, False)`` = run now, else
        ``(delay_ms, reserved)``."""
        try:
            delay, reserved = self._acquire(keys=list(keys), args=[repr(float(interval_ms)), int(has_slot)])
        except RedisError as exc:
            raise RPCConnectionError(f"could not reach the rate limiter: {exc}") from exc
        return int(delay), bool(reserved)


# -- Redis Streams (WebSocketRPCClient / RPCServer) -------------------------------------------

StreamEntry = tuple[str, dict[str, bytes]]


def _entry(raw: Any) -> StreamEntry:
    entry_id, fields = raw
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    out: dict[str, bytes] = {}
    for k, v in (fields or {}).items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = v if isinstance(v, bytes) else str(v).encode()
    return eid, out


class StreamIO:
    """Every Redis call of the Streams protocol: requests, consumer groups, replies, acks,
    dead letters and Pub/Sub broadcasts."""

    def __init__(
        self, client: redis.Redis, *, reply_ttl: int = 60, dead_maxlen: int = 100_000, pin: bool = False
    ) -> None:
        self.client = client
        self.reply_ttl = reply_ttl
        self.dead_maxlen = dead_maxlen
        #: Server side: run :meth:`read` and :meth:`finish` on a connection each (long-lived)
        #: thread keeps, instead of a pool checkout per command. Needs a pool with room for
        #: one connection per server thread.
        self.pin = pin

    def _fail(self, what: str, exc: Exception) -> RPCConnectionError:
        return RPCConnectionError(f"Redis {what} failed: {exc}")

    # client side
    def add_request(self, stream: str, payload: bytes, maxlen: int) -> str:
        """``XADD stream MAXLEN ~ maxlen * payload <json>``; returns the entry id."""
        try:
            entry_id = self.client.xadd(stream, {"payload": payload}, maxlen=maxlen, approximate=True)
        except RedisError as exc:
            raise self._fail("XADD", exc) from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    @staticmethod
    def request_command(stream: str, payload: bytes, maxlen: int) -> tuple[Any, ...]:
        """The ``XADD`` of :meth:`add_request` as a raw command, to send ahead of the reply's
        ``BLPOP`` in one write (:meth:`ReplyChannel.wait` ``first=``)."""
        return ("XADD", stream, "MAXLEN", "~", maxlen, "*", "payload", payload)

    def failed(self, what: str, exc: Exception) -> RPCConnectionError:
        """The :class:`RPCConnectionError` for a failed ``what`` (secrets redacted)."""
        return self._fail(what, exc)

    def publish(self, channel: str, data: bytes) -> int:
        """``PUBLISH``; returns the number of subscribers that got it."""
        try:
            return int(self.client.publish(channel, data))
        except RedisError as exc:
            raise self._fail("PUBLISH", exc) from exc

    # server side
    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (reading from the start) and the stream if missing."""
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise self._fail("XGROUP CREATE", exc) from exc
        except RedisError as exc:
            raise self._fail("XGROUP CREATE", exc) from exc

    def read(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        """New entries for ``consumer`` (``XREADGROUP ... >``), blocking up to ``block_ms``."""
        command = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block_ms)
        try:
            args = (*command, "STREAMS", stream, ">")
            got: Any = blocking_command(self.client, *args, wait=block_ms / 1000, pinned=self.pin)
        except RedisError as exc:
            raise self._fail("XREADGROUP", exc) from exc
        # RESP2: [[stream, [entry, ...]]]; RESP3 (protocol=3): {stream: [[entry, ...]]}.
        streams = (
            [items[0] if items else [] for items in got.values()]
            if isinstance(got, dict)
            else [items for _name, items in got or []]
        )
        entries: list[StreamEntry] = []
        for items in streams:
            entries.extend(_entry(item) for item in items if item and item[1] is not None)
        return entries

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[StreamEntry], list[str]]:
        """``XAUTOCLAIM``: take over entries idle longer than ``min_idle_ms``. Returns
        ``(next_start, entries, deleted_ids)``; deleted ids were trimmed away while pending."""
        try:
            raw = self.client.xautoclaim(stream, group, consumer, min_idle_ms, start_id=start, count=count)
        except RedisError as exc:
            raise self._fail("XAUTOCLAIM", exc) from exc
        next_start = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        entries = [_entry(item) for item in raw[1] if item and item[1] is not None]
        deleted_raw = list(raw[2]) if len(raw) > 2 else []
        deleted = [d.decode() if isinstance(d, bytes) else str(d) for d in deleted_raw]
        deleted += [(i.decode() if isinstance(i, bytes) else str(i)) for i, f in raw[1] if f is None]
        return next_start, entries, deleted

    def touch(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer is still working on (``XCLAIM ...
        JUSTID``, which does not count as a delivery), so nobody reclaims them."""
        if not entry_ids:
            return
        try:
            ids: list[Any] = list(entry_ids)
            self.client.xclaim(stream, group, consumer, 0, ids, justid=True)
        except RedisError as exc:
            raise self._fail("XCLAIM", exc) from exc

    def deliveries(self, stream: str, group: str, entry_ids: list[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (``XPENDING``)."""
        if not entry_ids:
            return {}
        try:
            rows = self.client.xpending_range(
                stream,
                group,
                min=min(entry_ids, key=_id_key),
                max=max(entry_ids, key=_id_key),
                count=len(entry_ids) * 4 + 10,
            )
        except RedisError as exc:
            raise self._fail("XPENDING", exc) from exc
        wanted = set(entry_ids)
        out: dict[str, int] = {}
        for row in rows:
            mid = row["message_id"]
            mid = mid.decode() if isinstance(mid, bytes) else str(mid)
            if mid in wanted:
                out[mid] = int(row["times_delivered"])
        return out

    def finish(
        self,
        stream: str,
        group: str,
        entry_id: str,
        reply_to: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Reply (if any) and ``XACK`` in one transaction (``MULTI``/``EXEC``), on this
        thread's own connection (the server's pool threads are long-lived)."""
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if reply_to is not None and payload is not None:
            commands += [("LPUSH", reply_to, payload), ("EXPIRE", reply_to, self.reply_ttl)]
        commands += [("XACK", stream, group, entry_id), ("EXEC",)]
        try:
            replies = pipelined(self.client, commands, pinned=self.pin)
        except RedisError as exc:
            raise self._fail("reply/XACK", exc) from exc
        failed = [r for r in replies[-1] or [] if isinstance(r, Exception)]
        if replies[-1] is None or failed:
            raise self._fail("reply/XACK", failed[0] if failed else RedisError("transaction aborted"))

    def dead_letter(
        self,
        stream: str,
        group: str,
        entry_id: str,
        dead_stream: str,
        fields: dict[Any, Any],
        reply_to: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Copy an entry to ``dead_stream`` with the reason, reply (if possible) and ``XACK``,
        all in one transaction."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(dead_stream, fields, maxlen=self.dead_maxlen, approximate=True)
                if reply_to is not None and payload is not None:
                    queue_reply(pipe, reply_to, payload, self.reply_ttl)
                pipe.xack(stream, group, entry_id)
                pipe.execute()
        except RedisError as exc:
            raise self._fail("dead-letter", exc) from exc

    def backlog(self, stream: str, group: str) -> tuple[int, int]:
        """``(pending, lag)`` of the group (lag = entries not yet delivered; -1 if unknown)."""
        try:
            for info in self.client.xinfo_groups(stream):
                name = info.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                if name == group:
                    lag = info.get("lag")
                    return int(info.get("pending", 0)), int(lag) if lag is not None else -1
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0, 0
            raise self._fail("XINFO GROUPS", exc) from exc
        except RedisError as exc:
            raise self._fail("XINFO GROUPS", exc) from exc
        return 0, -1


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# -- WebSocket server state (asyncio) ---------------------------------------------------------


class AsyncWSStore:
    """Presence, rooms, instance heartbeats and cross-instance delivery for the WebSocket
    server, on ``redis.asyncio``. Presence records expire (``ttl`` seconds) unless the owning
    instance refreshes them, so a dead instance's users go offline by themselves."""

    def __init__(self, client: Any, *, ttl: int = 30, ack_ttl: int = 30) -> None:
        self.client = client
        self.ttl = ttl
        self.ack_ttl = ack_ttl

    @classmethod
    def from_config(cls, config: WebSocketRPCConfig, *, ttl: int = 30) -> AsyncWSStore:
        """Build with a ``redis.asyncio`` pool from ``config``."""
        import redis.asyncio as aioredis

        options: dict[str, Any] = {}
        try:
            from redis.maint_notifications import MaintNotificationsConfig
        except ImportError:  # redis-py < 7: no such feature, pooled connections are checked
            pass
        else:
            # redis-py skips its check-out test of pooled connections ("closed by the
            # server?") while maintenance notifications (a Redis Enterprise/Cloud feature) are
            # on, and they are on ("auto") by default: after a Redis restart, the first command
            # on each stale connection failed. With them off, a stale connection is replaced
            # before anything is sent on it (a retry after the fact could run a command twice).
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.redis_max_connections,
            timeout=config.redis_pool_timeout,
            socket_keepalive=True,
            socket_connect_timeout=5.0,
            **options,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, ttl=ttl)

    def _fail(self, what: str, exc: Exception) -> RPCConnectionError:
        return RPCConnectionError(f"Redis {what} failed: {exc}")

    async def register(self, connection_id: str, user_id: str, record: bytes) -> None:
        """Record a live connection of ``user_id``."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(_protocol.ws_conn_key(connection_id), record, ex=self.ttl)
                pipe.sadd(_protocol.ws_user_key(user_id), connection_id)
                pipe.expire(_protocol.ws_user_key(user_id), self.ttl * 4)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence register", exc) from exc

    async def refresh(self, instance_id: str, records: list[tuple[str, str, bytes]]) -> None:
        """Heartbeat: extend this instance's and its connections' presence."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(_protocol.ws_instance_key(instance_id), b"1", ex=self.ttl)
                for connection_id, user_id, record in records:
                    pipe.set(_protocol.ws_conn_key(connection_id), record, ex=self.ttl)
                    pipe.sadd(_protocol.ws_user_key(user_id), connection_id)
                    pipe.expire(_protocol.ws_user_key(user_id), self.ttl * 4)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence refresh", exc) from exc

    async def unregister(self, connection_id: str, user_id: str) -> None:
        """Forget a closed connection."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(_protocol.ws_conn_key(connection_id))
                pipe.srem(_protocol.ws_user_key(user_id), connection_id)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence unregister", exc) from exc

    async def user_connections(self, user_id: str) -> list[bytes]:
        """Presence records of the user's live connections (stale ids are pruned)."""
        try:
            ids = [
                i.decode() if isinstance(i, bytes) else str(i)
                for i in await self.client.smembers(_protocol.ws_user_key(user_id))
            ]
            if not ids:
                return []
            records = await self.client.mget([_protocol.ws_conn_key(i) for i in ids])
            stale = [i for i, rec in zip(ids, records, strict=True) if rec is None]
            if stale:
                await self.client.srem(_protocol.ws_user_key(user_id), *stale)
            return [rec for rec in records if rec is not None]
        except RedisError as exc:
            raise self._fail("presence lookup", exc) from exc

    async def room_join(self, room: str, user_id: str) -> int:
        """Add ``user_id`` to ``room``; returns the member count."""
        return await self._room_change(room, user_id, join=True)

    async def room_leave(self, room: str, user_id: str) -> int:
        """Remove ``user_id`` from ``room``; returns the member count."""
        return await self._room_change(room, user_id, join=False)

    async def _room_change(self, room: str, user_id: str, *, join: bool) -> int:
        key = _protocol.ws_room_key(room)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                (pipe.sadd if join else pipe.srem)(key, user_id)
                pipe.scard(key)
                _, count = await pipe.execute()
            return int(count)
        except RedisError as exc:
            raise self._fail("room join" if join else "room leave", exc) from exc

    async def room_members(self, room: str) -> set[str]:
        """User ids in ``room``."""
        try:
            return {
                m.decode() if isinstance(m, bytes) else str(m)
                for m in await self.client.smembers(_protocol.ws_room_key(room))
            }
        except RedisError as exc:
            raise self._fail("room members", exc) from exc

    async def publish(self, channel: str, data: bytes | str) -> int:
        """``PUBLISH``; returns the number of subscribers."""
        try:
            return int(await self.client.publish(channel, data))
        except RedisError as exc:
            raise self._fail("PUBLISH", exc) from exc

    async def ack(self, key: str, count: int) -> None:
        """Report to the fan-out originator how many sockets took its frame."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                queue_reply(pipe, key, str(count).encode(), self.ack_ttl)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("ack", exc) from exc

    async def collect_acks(self, key: str, expected: int, timeout: float) -> list[int]:
        """Wait (up to ``timeout`` s in total) for ``expected`` acks on ``key``."""
        got: list[int] = []
        deadline = time.monotonic() + timeout
        try:
            while len(got) < expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                popped = await self.client.blpop([key], timeout=max(0.01, round(left, 3)))
                if popped is None:
                    break
                got.append(int(popped[1]))
            await self.client.delete(key)
        except RedisError as exc:
            raise self._fail("ack wait", exc) from exc
        return got

    async def add_request(self, stream: str, payload: bytes, maxlen: int) -> str:
        """``XADD`` a request (the bridge towards Django)."""
        try:
            entry_id = await self.client.xadd(stream, {"payload": payload}, maxlen=maxlen, approximate=True)
        except RedisError as exc:
            raise self._fail("XADD", exc) from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def wait_reply(self, key: str, timeout: float) -> bytes | None:
        """``BLPOP`` a reply (then delete the key)."""
        try:
            popped = await self.client.blpop([key], timeout=max(0.01, round(timeout, 3)))
            await self.client.delete(key)
        except RedisError as exc:
            raise self._fail("BLPOP", exc) from exc
        return None if popped is None else popped[1]
