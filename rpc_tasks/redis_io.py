"""All Redis I/O of the reply path in one place: connection pools and reply lists.

``ReplyChannel.push`` writes a reply and its TTL atomically (``MULTI``/``LPUSH``/``EXPIRE``/
``EXEC``), so a reply key never exists without a TTL. ``ReplyChannel.wait`` pops the reply with
``BLPOP`` (float timeout, millisecond precision) and deletes the key in the same round trip.
Every redis-py exception is turned into :class:`~rpc_tasks.exceptions.RPCConnectionError`.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from redis.exceptions import RedisError

from .config import WebSocketRPCConfig, redact_url
from .exceptions import RPCConnectionError
from .protocol import reply_key

logger = logging.getLogger("rpc_tasks.redis")

#: Smallest blocking timeout we send (BLPOP 0 would block forever).
MIN_BLOCK_SECONDS = 0.001


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

        The key is deleted in the same round trip (a duplicate reply, e.g. after a redelivery,
        does not linger).
        """
        block = max(float(timeout), MIN_BLOCK_SECONDS)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.blpop([key], timeout=round(block, 3))
                pipe.delete(key)
                popped, _ = pipe.execute()
        except RedisError as exc:
            raise RPCConnectionError(f"lost Redis while waiting for a reply: {exc}") from exc
        if popped is None:
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
