"""Params and results of the WebSocket server's own RPC methods, and what the bridge hands to
Django (the notification and broadcast models are shared: :mod:`rpc_tasks.models`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..models.connections import ConnectionInfo

#: Room names: letters, digits and ``_ . : -``, 1 to 128 characters.
ROOM_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"


class RoomRequest(BaseModel):
    """``join_room`` / ``leave_room`` params."""

    user_id: str = Field(min_length=1, max_length=256)
    room: str = Field(pattern=ROOM_PATTERN)


class RoomResponse(BaseModel):
    """Room membership after the change."""

    room: str
    user_id: str
    members: int
    joined: bool | None = Field(default=None, description="django-ipc's answer to join_room")
    left: bool | None = Field(default=None, description="django-ipc's answer to leave_room")


class PresenceQuery(BaseModel):
    """``get_presence`` params."""

    user_id: str = Field(min_length=1, max_length=256)


class PresenceResponse(BaseModel):
    """A user's live connections, on any instance."""

    user_id: str
    connected: bool
    connections: list[ConnectionInfo] = Field(default_factory=list)


class BridgeParams(BaseModel):
    """Params a Django-side bridge handler receives: the *authenticated* user and connection,
    and what the browser sent (``data``, untrusted)."""

    user_id: str
    connection_id: str
    data: dict[str, Any] = Field(default_factory=dict)
