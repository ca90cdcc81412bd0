"""The WebSocket server's state in Redis (asyncio): presence, rooms, instance heartbeats,
cross-instance delivery acks and the bridge's requests. Every key it touches is built here."""

from __future__ import annotations

import time
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import WebSocketRPCConfig
from ..exceptions import RPCConnectionError
from ..redis.connection import MIN_BLOCK_SECONDS, SERVER_SLACK_SECONDS
from ..redis.replies import queue_reply
from ..redis.topology import async_client, is_cluster, is_topology_url

#: Prefix of the WebSocket server's shared state (presence, rooms, instance channels).
KEY_PREFIX = "rpc_tasks:ws:"


def conn_key(connection_id: str) -> str:
    """Presence record of one connection (JSON ``ConnectionInfo``, with a TTL)."""
    return f"{KEY_PREFIX}conn:{connection_id}"


def user_key(user_id: str) -> str:
    """Set of a user's connection ids (entries without a live :func:`conn_key` are stale)."""
    return f"{KEY_PREFIX}user:{user_id}"


def room_key(room: str) -> str:
    """Set of the user ids in a room."""
    return f"{KEY_PREFIX}room:{room}"


def instance_key(instance_id: str) -> str:
    """Heartbeat of a server instance (with a TTL)."""
    return f"{KEY_PREFIX}instance:{instance_id}"


def instance_channel(instance_id: str) -> str:
    """Pub/Sub channel on which an instance receives deliveries for its sockets."""
    return f"{KEY_PREFIX}to:{instance_id}"


def ack_key(correlation_id: str) -> str:
    """List on which instances report how many sockets took a fanned-out frame."""
    return f"{KEY_PREFIX}ack:{correlation_id}"


class AsyncWSStore:
    """Presence, rooms, instance heartbeats and cross-instance delivery for the WebSocket
    server, on ``redis.asyncio``. Presence records expire (``ttl`` seconds) unless the owning
    instance refreshes them, so a dead instance's users go offline by themselves."""

    def __init__(self, client: Any, *, ttl: int = 30, ack_ttl: int = 30) -> None:
        self.client = client
        self.ttl = ttl
        self.ack_ttl = ack_ttl
        #: Presence writes touch a connection's key and its user's set: one MULTI on a single
        #: Redis; on a Redis Cluster (two slots) a plain pipeline (issue 18), which is enough
        #: since lookups prune ids whose record is gone.
        self._presence_atomic = not is_cluster(client)

    @classmethod
    def from_config(cls, config: WebSocketRPCConfig, *, ttl: int = 30) -> AsyncWSStore:
        """Build with a ``redis.asyncio`` pool from ``config``."""
        import redis.asyncio as aioredis

        if is_topology_url(config.redis_url):  # scale-out (issue 18): Sentinel or Cluster
            return cls(async_client(config.redis_url, max_connections=config.redis_max_connections), ttl=ttl)
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

    async def ready(self) -> None:
        """Connect what must be connected before Pub/Sub: a Redis Cluster client loads its slot
        map (its ``pubsub()`` needs it; other commands load it on first use). No-op otherwise."""
        if is_cluster(self.client):
            await self.client.initialize()

    def _fail(self, what: str, exc: Exception) -> RPCConnectionError:
        return RPCConnectionError(f"Redis {what} failed: {exc}")

    async def register(self, connection_id: str, user_id: str, record: bytes) -> None:
        """Record a live connection of ``user_id``."""
        try:
            async with self.client.pipeline(transaction=self._presence_atomic) as pipe:
                pipe.set(conn_key(connection_id), record, ex=self.ttl)
                pipe.sadd(user_key(user_id), connection_id)
                pipe.expire(user_key(user_id), self.ttl * 4)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence register", exc) from exc

    async def refresh(self, instance_id: str, records: list[tuple[str, str, bytes]]) -> None:
        """Heartbeat: extend this instance's and its connections' presence."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(instance_key(instance_id), b"1", ex=self.ttl)
                for connection_id, user_id, record in records:
                    pipe.set(conn_key(connection_id), record, ex=self.ttl)
                    pipe.sadd(user_key(user_id), connection_id)
                    pipe.expire(user_key(user_id), self.ttl * 4)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence refresh", exc) from exc

    async def unregister(self, connection_id: str, user_id: str) -> None:
        """Forget a closed connection."""
        try:
            async with self.client.pipeline(transaction=self._presence_atomic) as pipe:
                pipe.delete(conn_key(connection_id))
                pipe.srem(user_key(user_id), connection_id)
                await pipe.execute()
        except RedisError as exc:
            raise self._fail("presence unregister", exc) from exc

    async def user_connections(self, user_id: str) -> list[bytes]:
        """Presence records of the user's live connections (stale ids are pruned)."""
        try:
            ids = [
                i.decode() if isinstance(i, bytes) else str(i)
                for i in await self.client.smembers(user_key(user_id))
            ]
            if not ids:
                return []
            # On a cluster the keys are spread over slots: one MGET per node (issue 18).
            mget = self.client.mget if self._presence_atomic else self.client.mget_nonatomic
            records = await mget([conn_key(i) for i in ids])
            stale = [i for i, rec in zip(ids, records, strict=True) if rec is None]
            if stale:
                await self.client.srem(user_key(user_id), *stale)
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
        key = room_key(room)
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
                for m in await self.client.smembers(room_key(room))
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
        """Wait up to ``timeout`` seconds for a reply on ``key``: ``BLPOP`` with ``DEL key``
        pipelined behind it (one round trip, nothing left behind), read with its own deadline
        whatever the pool's ``socket_timeout``. ``None`` when no reply came in time (the
        connection is then dropped, which cancels the ``BLPOP`` on the server)."""
        wait = max(MIN_BLOCK_SECONDS, float(timeout))
        if not self._presence_atomic:  # a cluster (issue 18): the client routes, two round trips
            return await self._wait_reply_cluster(key, wait)
        pool = self.client.connection_pool
        try:
            conn = await pool.get_connection()
        except RedisError as exc:
            raise self._fail("BLPOP", exc) from exc
        try:
            commands = [("BLPOP", key, round(wait + SERVER_SLACK_SECONDS, 3)), ("DEL", key)]
            await conn.send_packed_command(conn.pack_commands(commands))
            try:
                popped = await conn.read_response(timeout=wait)
            except RedisTimeoutError:
                await conn.disconnect()
                return None
            await conn.read_response()
        except (RedisError, OSError) as exc:
            await conn.disconnect()
            raise self._fail("BLPOP", exc) from exc
        except BaseException:  # cancelled mid-wait: never pool a connection with replies due
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        if not popped:
            return None
        value = popped[1]
        return value if isinstance(value, bytes) else str(value).encode()

    async def _wait_reply_cluster(self, key: str, wait: float) -> bytes | None:
        """:meth:`wait_reply` on a Redis Cluster: ``BLPOP`` then ``DEL`` through the cluster
        client (it follows moved slots), the server's timeout to 10 ms."""
        try:
            popped = await self.client.blpop([key], timeout=max(0.01, round(wait, 3)))
            await self.client.delete(key)
        except RedisError as exc:
            raise self._fail("BLPOP", exc) from exc
        if not popped:
            return None
        value = popped[1]
        return value if isinstance(value, bytes) else str(value).encode()
