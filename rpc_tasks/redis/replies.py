"""Reply lists in Redis: the one place a reply is pushed and waited for.

``ReplyChannel.push`` writes a reply and its TTL atomically, in one small script
(:data:`PUSH_REPLY_LUA`) that runs ``EXPIRE`` only when the ``LPUSH`` succeeded: a reply key
never exists without a TTL, and a key of another type under the reply prefix is left exactly
as it was (the push fails with Redis's ``WRONGTYPE`` error). ``ReplyChannel.wait`` pops the reply with
``BLPOP`` (float timeout, millisecond precision) and deletes the key in the same round trip.
Every redis-py exception is turned into :class:`~rpc_tasks.exceptions.RPCConnectionError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.exceptions import AskError, RedisError, TryAgainError

from ..config import WebSocketRPCConfig
from ..exceptions import RPCConnectionError
from ..protocol import reply_key
from . import topology
from .connection import (
    CLUSTER_REDIRECT_SECONDS,
    MIN_BLOCK_SECONDS,
    SERVER_SLACK_SECONDS,
    checkout,
    client_from_config,
    pack,
    wait_readable,
)

logger = logging.getLogger(__name__)

#: How far past the deadline the reply to the command sent ahead of the ``BLPOP`` is waited for.
FIRST_REPLY_SLACK_SECONDS = 0.02


#: ``LPUSH`` a reply and, only if that succeeded, ``EXPIRE`` its key (KEYS[1]; ARGV: reply, TTL).
PUSH_REPLY_LUA = """
local pushed = redis.pcall('lpush', KEYS[1], ARGV[1])
if type(pushed) == 'table' and pushed.err then
  return redis.error_reply(pushed.err)
end
redis.call('expire', KEYS[1], ARGV[2])
return pushed
"""


def queue_reply(pipe: Any, key: str, payload: bytes, ttl: int) -> None:
    """Add a reply push (``LPUSH``, then ``EXPIRE`` only if it succeeded, atomically) to a
    pipeline; its error reply (e.g. ``WRONGTYPE``) is the pipeline's result for it."""
    pipe.eval(PUSH_REPLY_LUA, 1, key, payload, ttl)


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
        self._push_script = client.register_script(PUSH_REPLY_LUA)

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
        """``LPUSH`` + ``EXPIRE`` atomically, the ``EXPIRE`` only when the ``LPUSH`` succeeded
        (never a key without a TTL, never a TTL on someone else's key); one round trip."""
        try:
            # scale-out (issue 18): on a cluster, the push runs on the key's node
            client = topology.node_client(self.client, key)
            if client is not self.client:
                deadline = time.monotonic() + min(self.ttl, CLUSTER_REDIRECT_SECONDS)
                topology.on_cluster_node(
                    self.client, key, lambda node: self._push_on(node, key, payload), deadline
                )
                return
            self._push_script(keys=[key], args=[payload, self.ttl])
        except RedisError as exc:
            raise RPCConnectionError(f"could not push reply to {key!r}: {exc}") from exc

    def _push_on(self, node: redis.Redis, key: str, payload: bytes) -> None:
        """``push`` on one cluster node (scale-out, issue 18); ``MOVED``/``ASK`` raised as such."""
        with node.pipeline(transaction=True) as pipe:
            queue_reply(pipe, key, payload, self.ttl)
            pipe.execute()

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
        if topology.is_cluster(self.client):  # scale-out (issue 18): on the key's node
            return self._blocking_pop_cluster(key, timeout, follow_up, first, on_first)
        return self._blocking_pop_on(self.client, key, timeout, follow_up, first, on_first)

    def _blocking_pop_cluster(
        self,
        key: str,
        timeout: float,
        follow_up: tuple[Any, ...] | None,
        first: tuple[Any, ...] | None,
        on_first: Callable[[Any], None] | None,
    ) -> list[Any] | None:
        """:meth:`_blocking_pop` on a Redis Cluster: ``first`` (its key lives in another slot)
        goes out on its own, then the ``BLPOP`` on the node owning ``key``, following a slot
        that moves meanwhile until the deadline."""
        deadline = time.monotonic() + max(float(timeout), MIN_BLOCK_SECONDS)
        if first is not None:
            try:
                reply = cast(Any, self.client).execute_command(*first)
            except redis.ResponseError:
                raise  # as on a single Redis: the caller handles a failed request
            except RedisError as exc:
                raise RPCConnectionError(f"could not send the request: {exc}") from exc
            if on_first is not None:
                on_first(reply)

        def pop(node: redis.Redis) -> list[Any] | None:
            left = deadline - time.monotonic()
            return None if left <= 0 else self._blocking_pop_on(node, key, left, follow_up, None, None)

        return topology.on_cluster_node(self.client, key, pop, deadline)

    def _blocking_pop_on(
        self,
        client: redis.Redis,
        key: str,
        timeout: float,
        follow_up: tuple[Any, ...] | None,
        first: tuple[Any, ...] | None = None,
        on_first: Callable[[Any], None] | None = None,
    ) -> list[Any] | None:
        wait_for = max(float(timeout), MIN_BLOCK_SECONDS)
        deadline = time.monotonic() + wait_for
        commands: list[tuple[Any, ...]] = [("BLPOP", key, round(wait_for + SERVER_SLACK_SECONDS, 3))]
        if first is not None:
            commands.insert(0, first)
        if follow_up is not None:
            commands.append(follow_up)
        pool = client.connection_pool
        try:
            # A free connection is waited for until the deadline at most (nothing is sent,
            # in particular no enqueue, when none came in time).
            conn: Any = checkout(pool, wait_for)
        except RedisError as exc:
            if time.monotonic() >= deadline:
                return None
            raise RPCConnectionError(f"no Redis connection for the reply: {exc}") from exc
        failed_first: BaseException | None = None
        try:
            # No health-check PING (it would wait for the socket timeout on a frozen Redis):
            # the deadline-bounded wait below is the liveness check.
            conn.send_packed_command(pack(conn, commands), check_health=False)
            if first is not None:
                # The outcome of ``first`` (e.g. "enqueued") is read until a few ms past the
                # deadline (a very short timeout), so that ``on_first`` runs; a frozen Redis
                # does not hold the caller longer than that.
                if not wait_readable(conn, deadline + FIRST_REPLY_SLACK_SECONDS):
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
            if not wait_readable(conn, deadline):
                conn.disconnect()  # cancels the pending BLPOP; the pool reconnects on next use
                return None
            return [conn.read_response() for _ in commands]
        except (AskError, TryAgainError):  # a moved/moving cluster slot (issue 18): followed by the caller
            conn.disconnect()
            raise
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
