"""Notification models: what Django sends to a connected user and what it gets back."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class NotificationPriority(str, Enum):
    """How urgent a notification is; the WebSocket server may order or style by it."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class NotificationRequest(BaseModel):
    """Send one notification to every socket of ``user_id``.

    ``require_connected=True`` turns "user is offline" into a ``user_not_connected`` error
    instead of a successful response with ``delivered=False``.
    """

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=256)
    notification_type: str = Field(min_length=1, max_length=128)
    title: str = Field(max_length=1024)
    message: str = Field(max_length=65536)
    priority: NotificationPriority = NotificationPriority.NORMAL
    data: dict[str, Any] = Field(default_factory=dict)
    require_connected: bool = False


class NotificationResponse(BaseModel):
    """Outcome of a notification: ``delivered`` only if at least one socket took the frame."""

    model_config = ConfigDict(extra="ignore")

    delivered: bool
    user_connected: bool
    connection_count: int = Field(default=0, ge=0)
    notification_id: str | None = None


class BatchNotificationRequest(BaseModel):
    """Send the same notification to several users (1 to 1000)."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[str] = Field(min_length=1, max_length=1000)
    notification_type: str = Field(min_length=1, max_length=128)
    title: str = Field(max_length=1024)
    message: str = Field(max_length=65536)
    priority: NotificationPriority = NotificationPriority.NORMAL
    data: dict[str, Any] = Field(default_factory=dict)


class BatchNotificationResponse(BaseModel):
    """Per-batch counts plus which users got it and which were offline."""

    model_config = ConfigDict(extra="ignore")

    total: int = Field(ge=0)
    delivered: int = Field(ge=0)
    failed: int = Field(ge=0)
    delivered_user_ids: list[str] = Field(default_factory=list)
    offline_user_ids: list[str] = Field(default_factory=list)
