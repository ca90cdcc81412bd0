"""Delivery to sockets: this instance's own, and other instances' over Redis Pub/Sub.

Every instance subscribes to its own channel (deliveries for users whose sockets it holds) and
to ``broadcast_channel``. The instance that serves a request publishes to the instances that
hold the user's sockets (from presence in Redis); each answers on an ack list how many sockets
took the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from .. import metrics
from ..exceptions import RPCException
from ..models.broadcast import BroadcastRequest, BroadcastResponse, BroadcastTarget
from ..models.connections import ConnectionInfo
from . import frames
from .connection import Connection
from .store import AsyncWSStore, ack_key, instance_channel

logger = logging.getLogger("rpc_tasks.websocket.server")


class Fanout:
    """This instance's sockets, and delivery to a user's sockets on any instance.

    Parameters:
      store: the shared state in Redis.
      instance_id: this instance's name (its Pub/Sub channel).
      broadcast_channel: the channel every instance listens on.
      delivery_timeout: seconds to wait for sockets (and other instances) to take a frame.
      counters: where to count broadcasts.
    """

    def __init__(
        self,
        store: AsyncWSStore,
        *,
        instance_id: str,
        broadcast_channel: str,
        delivery_timeout: float,
        counters: Counter[str],
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.broadcast_channel = broadcast_channel
        self.delivery_timeout = delivery_timeout
        self.counters = counters
        self.conns: dict[str, Connection] = {}
        self._by_user: dict[str, set[str]] = defaultdict(set)
        #: Set when the subscription came back after a loss (Redis may have restarted empty).
        self.resync = asyncio.Event()

    # -- this instance's sockets ---------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        """Track a new socket."""
        self.conns[conn.id] = conn
        self._by_user[conn.user_id].add(conn.id)

    def remove(self, conn: Connection) -> None:
        """Forget a closed socket."""
        self.conns.pop(conn.id, None)
        self._by_user[conn.user_id].discard(conn.id)
        if not self._by_user[conn.user_id]:
            self._by_user.pop(conn.user_id, None)

    async def deliver(self, conn_ids: list[str], frame: str) -> int:
        """Queue ``frame`` on these local sockets; how many took it within the timeout."""
        waits = [
            f
            for f in (self.conns[c].offer(frame, wait=True) for c in conn_ids if c in self.conns)
            if f is not None
        ]
        if not waits:
            return 0
        done, _ = await asyncio.wait(waits, timeout=self.delivery_timeout)
        took = sum(1 for f in done if f.result())
        metrics.emit("ws_delivery", instance=self.instance_id, offered=len(waits), took=took)
        return took

    def local_conns_of(
        self, users: set[str] | None, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[str]:
        """Local socket ids of ``users`` (``None``: everybody), minus ``exclude``d users."""
        if users is None:
            return [c.id for c in self.conns.values() if c.user_id not in exclude]
        return [cid for u in users if u not in exclude for cid in self._by_user.get(u, ())]

    async def deliver_broadcast_local(self, req: BroadcastRequest) -> tuple[int, int]:
        """Deliver a broadcast to this instance's matching sockets: ``(sockets, users)``."""
        frame = frames.frame(
            "broadcast",
            {
                "event_type": req.event_type,
                "payload": req.payload,
                "target": req.target.value,
                "room": req.room,
                "title": req.title,
                "message": req.message,
            },
        )
        users: set[str] | None
        if req.target is BroadcastTarget.ALL:
            users = None
        elif req.target is BroadcastTarget.ROOM:
            users = await self.store.room_members(req.room or "")
        else:
            users = set(req.recipients() or ())
        conn_ids = self.local_conns_of(users, set(req.exclude_user_ids))
        sockets = await self.deliver(conn_ids, frame)
        reached = {self.conns[c].user_id for c in conn_ids if c in self.conns}
        return sockets, len(reached)

    # -- across instances ----------------------------------------------------------------------

    async def deliver_to_user(self, user_id: str, frame: str) -> tuple[int, int]:
        """Deliver on every instance; returns ``(connections, sockets_that_took_it)``."""
        records = [ConnectionInfo.model_validate_json(r) for r in await self.store.user_connections(user_id)]
        local = [r.connection_id for r in records if r.instance_id == self.instance_id]
        remote = {r.instance_id for r in records if r.instance_id and r.instance_id != self.instance_id}
        took = await self.deliver(local, frame) if local else 0
        if remote:
            ack = ack_key(uuid.uuid4().hex)
            expected = 0
            for instance in remote:
                message = json.dumps({"op": "user", "user_id": user_id, "frame": frame, "ack": ack})
                expected += min(1, await self.store.publish(instance_channel(instance), message))
            acks = await self.store.collect_acks(ack, expected, self.delivery_timeout + 1)
            metrics.emit("ws_fanout_acks", instance=self.instance_id, expected=expected, received=len(acks))
            took += sum(acks)
        return len(records), took

    async def broadcast(self, req: BroadcastRequest) -> BroadcastResponse:
        """Broadcast through every instance and count the sockets and users reached."""
        ack = ack_key(uuid.uuid4().hex)
        envelope = json.dumps({"broadcast": req.model_dump(mode="json"), "ack": ack})
        instances = await self.store.publish(self.broadcast_channel, envelope)
        acks = await self.store.collect_acks(ack, instances, self.delivery_timeout + 1)
        metrics.emit("ws_fanout_acks", instance=self.instance_id, expected=instances, received=len(acks))
        return BroadcastResponse(
            target=req.target,
            recipients=sum(a // 1_000_000 for a in acks),
            users=sum(a % 1_000_000 for a in acks),
            room=req.room,
            user_id=req.user_id,
        )

    async def listen(self, ready: asyncio.Event) -> None:
        """Subscribe to this instance's channel and the broadcast channel. A Redis failure
        (restart, network) ends the subscription: subscribe again on a new connection, with
        backoff, instead of letting this task die (which silently stopped broadcasts and
        cross-instance delivery for the rest of the process's life)."""
        backoff = 0.1
        lost = False
        while True:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self.store.ready()  # a Redis Cluster client learns its slot map first
                await pubsub.subscribe(instance_channel(self.instance_id), self.broadcast_channel)
                if lost:
                    logger.warning("Pub/Sub subscription restored")
                    self.resync.set()  # Redis may have restarted empty: re-register presence now
                lost, backoff = False, 0.1
                ready.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    asyncio.get_running_loop().create_task(self._on_pubsub(message))
            except (RedisError, OSError) as exc:
                if not lost:
                    logger.warning("Pub/Sub connection lost (%s); resubscribing", exc)
                lost = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _on_pubsub(self, message: dict[str, Any]) -> None:
        try:
            channel = (
                message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            )
            obj = json.loads(message["data"])
            if channel == self.broadcast_channel:
                ack = None
                if isinstance(obj, dict) and "broadcast" in obj and "ack" in obj:
                    ack, obj = obj["ack"], obj["broadcast"]
                req = BroadcastRequest.model_validate(obj)
                sockets, users = await self.deliver_broadcast_local(req)
                self.counters["broadcasts"] += 1
                if ack:
                    await self.store.ack(ack, sockets * 1_000_000 + users)
            elif obj.get("op") == "user":
                sockets = await self.deliver(self.local_conns_of({obj["user_id"]}), obj["frame"])
                await self.store.ack(obj["ack"], sockets)
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            logger.warning("ignoring malformed Pub/Sub message: %s", exc)
        except RPCException as exc:
            logger.warning("could not handle Pub/Sub message: %s", exc)

    async def heartbeat(self, presence_ttl: float) -> None:
        """Keep this instance's and its sockets' presence alive (every ``presence_ttl / 3``
        seconds, and at once when :attr:`resync` is set after Redis came back)."""
        period = max(0.2, presence_ttl / 3)
        retry = 0.5
        while True:
            records = []
            for conn in list(self.conns.values()):
                conn.info.last_seen = datetime.now(timezone.utc)
                records.append((conn.id, conn.user_id, conn.info.model_dump_json().encode()))
            try:
                await self.store.refresh(self.instance_id, records)
                wait, retry = period, 0.5
            except RPCException as exc:
                # Retry sooner than a full period: after a Redis restart (no presence left)
                # users would look offline until the next successful refresh.
                logger.warning("presence heartbeat failed: %s", exc)
                wait, retry = min(retry, period), min(retry * 2, period)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.resync.wait(), wait)
            self.resync.clear()
