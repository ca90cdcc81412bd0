"""All Redis I/O of the reply path in one place: connection pools and reply lists.

``ReplyChannel.push`` writes a reply and its TTL atomically (``MULTI``/``LPUSH``/``EXPIRE``/
``EXEC``), so a reply key never exists without a TTL. ``ReplyChannel.wait`` pops the reply with
``BLPOP`` (float timeout, millisecond precision) and deletes the key in the same round trip.
Every redis-py exception is turned into :class:`~rpc_tasks.exceptions.RPCConnectionError`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.exceptions import RedisError

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
                pipe.lpush(key, payload)
                pipe.expire(key, self.ttl)
                pipe.execute()
        except RedisError as exc:
            raise RPCConnectionError(f"could not push reply to Redis: {exc}") from exc

    def wait(self, key: str, timeout: float) -> bytes | None:
        """Block up to ``timeout`` seconds for the reply on ``key``; ``None`` on timeout.

        Redis only checks blocking timeouts every ``1/hz`` seconds (100 ms by default), so the
        deadline is enforced on the client side with millisecond precision: ``BLPOP`` is sent
        with a little slack and, if nothing is readable by the deadline, the connection is
        dropped (which also cancels the pending ``BLPOP`` on the server). ``DEL key`` is
        pipelined behind the ``BLPOP`` so a duplicate reply (e.g. after a redelivery) does not
        linger, at no extra round trip.
        """
        wait_for = max(float(timeout), MIN_BLOCK_SECONDS)
        deadline = time.monotonic() + wait_for
        server_timeout = round(wait_for + SERVER_SLACK_SECONDS, 3)
        pool = self.client.connection_pool
        try:
            conn: Any = pool.get_connection()
        except RedisError as exc:
            raise RPCConnectionError(f"no Redis connection for the reply: {exc}") from exc
        try:
            conn.send_packed_command(conn.pack_commands([("BLPOP", key, server_timeout), ("DEL", key)]))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not conn.can_read(timeout=remaining):
                conn.disconnect()  # cancels the pending BLPOP; the pool reconnects on next use
                return None
            popped = conn.read_response()
            conn.read_response()  # DEL
        except (RedisError, OSError) as exc:
            conn.disconnect()
            raise RPCConnectionError(f"lost Redis while waiting for a reply: {exc}") from exc
        finally:
            pool.release(conn)
        if not popped:
            return None
        value = popped[1]
        return value if isinstance(value, bytes) else str(value).encode()

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

# Open (or extend, never shorten) a cooldown: the key's PTTL is the time left.
_OPEN_COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', want)
  return want
end
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

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._open = client.register_script(_OPEN_COOLDOWN)
        self._acquire = client.register_script(_ACQUIRE)

    def open_cooldown(self, key: str, duration_ms: int, reason: str = "") -> int:
        """Open or extend the cooldown ``key`` to at least ``duration_ms``; returns ms left."""
        try:
            return int(self._open(keys=[key], args=[max(1, int(duration_ms)), reason or "1"]))
        except RedisError as exc:
            raise RPCConnectionError(f"could not open a cooldown: {exc}") from exc

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
