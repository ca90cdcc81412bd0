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
