"""The WebSocket server's RPC methods (served from the request stream by an
:class:`~rpc_tasks.streams.server.RPCServer` in the same process): notifications, broadcasts,
rooms, presence."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from pydantic import BaseModel

from ..config import WebSocketRPCConfig
from ..exceptions import RPCRemoteError
from ..models.broadcast import BroadcastRequest, BroadcastResponse
from ..models.connections import ConnectionInfo
from ..models.errors import UserNotConnectedError
from ..models.notifications import (
    BatchNotificationRequest,
    BatchNotificationResponse,
    NotificationRequest,
    NotificationResponse,
)
from ..streams.server import RPCServer
from . import frames
from .fanout import Fanout
from .models import PresenceQuery, PresenceResponse, RoomRequest, RoomResponse
from .store import AsyncWSStore


class ServerMethods:
    """The methods, as coroutines on the server's event loop."""

    def __init__(self, store: AsyncWSStore, fanout: Fanout, counters: Counter[str]) -> None:
        self.store = store
        self.fanout = fanout
        self.counters = counters

    async def send_notification(self, req: NotificationRequest) -> NotificationResponse:
        """Deliver a notification to every socket of the user, on any instance."""
        notification_id = str(uuid.uuid4())
        frame = frames.frame(
            "notification", req.model_dump(mode="json", exclude={"require_connected"}), notification_id
        )
        connections, took = await self.fanout.deliver_to_user(req.user_id, frame)
        if connections == 0 and req.require_connected:
            raise RPCRemoteError(
                UserNotConnectedError(message=f"user {req.user_id!r} is not connected", user_id=req.user_id)
            )
        self.counters["notifications"] += 1
        return NotificationResponse(
            delivered=took > 0,
            user_connected=connections > 0,
            connection_count=connections,
            notification_id=notification_id,
        )

    async def send_batch(self, req: BatchNotificationRequest) -> BatchNotificationResponse:
        """Deliver one notification to several users."""
        delivered: list[str] = []
        offline: list[str] = []
        for user_id in dict.fromkeys(req.user_ids):
            single = NotificationRequest(
                user_id=user_id,
                notification_type=req.notification_type,
                title=req.title,
                message=req.message,
                priority=req.priority,
                data=req.data,
            )
            result = await self.send_notification(single)
            (delivered if result.delivered else offline).append(user_id)
        return BatchNotificationResponse(
            total=len(delivered) + len(offline),
            delivered=len(delivered),
            failed=len(offline),
            delivered_user_ids=delivered,
            offline_user_ids=offline,
        )

    async def broadcast(self, req: BroadcastRequest) -> BroadcastResponse:
        """Broadcast through every instance and count the sockets and users reached."""
        return await self.fanout.broadcast(req)

    async def join_room(self, req: RoomRequest) -> RoomResponse:
        """Add a user to a room (all their sockets, on every instance)."""
        return RoomResponse(
            room=req.room, user_id=req.user_id, members=await self.store.room_join(req.room, req.user_id)
        )

    async def leave_room(self, req: RoomRequest) -> RoomResponse:
        """Remove a user from a room."""
        return RoomResponse(
            room=req.room, user_id=req.user_id, members=await self.store.room_leave(req.room, req.user_id)
        )

    async def get_presence(self, req: PresenceQuery) -> PresenceResponse:
        """A user's live connections (from Redis presence, all instances)."""
        records = [
            ConnectionInfo.model_validate_json(r) for r in await self.store.user_connections(req.user_id)
        ]
        return PresenceResponse(user_id=req.user_id, connected=bool(records), connections=records)

    def table(self) -> list[tuple[str, Any, type[BaseModel], type[BaseModel]]]:
        """``(method name, coroutine function, params model, result model)`` of each method."""
        return [
            ("send_notification", self.send_notification, NotificationRequest, NotificationResponse),
            (
                "send_batch_notifications",
                self.send_batch,
                BatchNotificationRequest,
                BatchNotificationResponse,
            ),
            ("broadcast", self.broadcast, BroadcastRequest, BroadcastResponse),
            ("join_room", self.join_room, RoomRequest, RoomResponse),
            ("leave_room", self.leave_room, RoomRequest, RoomResponse),
            ("get_presence", self.get_presence, PresenceQuery, PresenceResponse),
        ]

    def rpc_server(
        self, config: WebSocketRPCConfig, *, consumer_name: str, concurrency: int, call_timeout: float
    ) -> RPCServer:
        """An :class:`RPCServer` whose handler threads run the methods on this (running) event
        loop, each waited for up to ``call_timeout`` seconds."""
        loop = asyncio.get_running_loop()
        server = RPCServer(config, consumer_name=consumer_name, concurrency=concurrency)

        def in_loop(coro_fn: Any) -> Any:
            def run(params: Any) -> Any:
                return asyncio.run_coroutine_threadsafe(coro_fn(params), loop).result(timeout=call_timeout)

            return run

        for name, coro_fn, params_model, result_model in self.table():
            server.register(name, in_loop(coro_fn), params_model=params_model, result_model=result_model)
        return server
