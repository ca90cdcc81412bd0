"""Broadcast models: one event to many users (everyone, a room, or a list of users)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BroadcastTarget(str, Enum):
    """Who receives a broadcast."""

    ALL = "all"
    ROOM = "room"
    USERS = "users"


class BroadcastRequest(BaseModel):
    """Broadcast ``event_type``/``payload`` to ``target`` (``room`` or ``user_ids`` as needed)."""

    model_config = ConfigDict(extra="forbid")

    target: BroadcastTarget = BroadcastTarget.ALL
    event_type: str = Field(min_length=1, max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict)
    room: str | None = Field(default=None, max_length=256)
    user_ids: list[str] = Field(default_factory=list, max_length=10000)
    exclude_user_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _target_fields(self) -> BroadcastRequest:
        if self.target is BroadcastTarget.ROOM and not self.room:
            raise ValueError("target='room' needs a room name")
        if self.target is BroadcastTarget.USERS and not self.user_ids:
            raise ValueError("target='users' needs at least one user id")
        return self


class BroadcastResponse(BaseModel):
    """How many sockets/users a broadcast reached."""

    model_config = ConfigDict(extra="ignore")

    recipients: int = Field(ge=0, description="sockets that took the frame")
    users: int = Field(default=0, ge=0)
