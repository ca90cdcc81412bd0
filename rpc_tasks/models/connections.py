"""Connection/presence models for WebSocket sockets."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import utcnow


class ConnectionState(str, Enum):
    """State of one WebSocket connection."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class ConnectionInfo(BaseModel):
    """One live WebSocket connection of a user."""

    model_config = ConfigDict(extra="ignore")

    connection_id: str
    user_id: str
    instance_id: str | None = None
    connected_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)
    rooms: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ConnectionStateUpdate(BaseModel):
    """A change of a connection's state (connected / disconnected)."""

    model_config = ConfigDict(extra="ignore")

    user_id: str
    connection_id: str
    state: ConnectionState
    instance_id: str | None = None
    timestamp: datetime = Field(default_factory=utcnow)
