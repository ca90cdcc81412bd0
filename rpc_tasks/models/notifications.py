"""Notification models: what Django sends to a connected user and what it gets back.

Both families of the protocol are read: ours (``notification_type``, ``user_connected``,
``connection_count``) and django-ipc's (``type``, ``expires_at``, ``connections``, ``error``,
``queued_for_later``). What we write carries both names, so that a django-ipc server or client
and ours each find the fields they require (see the README's compatibility section).
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)


class NotificationPriority(str, Enum):
    """How urgent a notification is; the WebSocket server may order or style by it."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


def _none_as_empty_dict(value: Any) -> Any:
    return {} if value is None else value


class NotificationRequest(BaseModel):
    """Send one notification to every socket of ``user_id``.

    ``notification_type`` is also read from (and written as) django-ipc's ``type``. Unknown keys
    are ignored and ``null`` stands for "not given". ``expires_at``: a notification whose time
    has passed is not delivered. ``require_connected=True`` turns "user is offline" into a
    ``user_not_connected`` error instead of a successful response with ``delivered=False``.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    user_id: str = Field(min_length=1, max_length=256)
    notification_type: str = Field(
        min_length=1, max_length=128, validation_alias=AliasChoices("notification_type", "type")
    )
    title: str = Field(max_length=1024)
    message: str = Field(max_length=65536)
    priority: NotificationPriority = NotificationPriority.NORMAL
    data: dict[str, Any] = Field(default_factory=dict)
    expires_at: datetime | None = None
    require_connected: bool = False

    @field_validator("data", mode="before")
    @classmethod
    def _null_data(cls, value: Any) -> Any:
        return _none_as_empty_dict(value)

    @field_validator("priority", "require_connected", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @model_serializer(mode="wrap")
    def _both_names(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "notification_type" in data:
            data["type"] = data["notification_type"]  # django-ipc's name for it
        return data

    @property
    def expired(self) -> bool:
        """True when ``expires_at`` lies in the past."""
        if self.expires_at is None:
            return False
        at = self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=timezone.utc)
        return at <= datetime.now(timezone.utc)


class NotificationResponse(BaseModel):
    """Outcome of a notification: ``delivered`` only if at least one socket took the frame.

    Carries both families' fields: ``user_connected``/``connection_count`` (ours) and
    ``user_id``/``connections``/``error``/``queued_for_later`` (django-ipc's). When a peer sends
    only one family, the other is derived (``user_connected`` is ``connections > 0``).
    """

    model_config = ConfigDict(extra="ignore")

    user_id: str = ""
    delivered: bool
    user_connected: bool = False
    connection_count: int = Field(default=0, ge=0)
    connections: int = Field(default=0, ge=0, description="the same as connection_count")
    error: str | None = None
    queued_for_later: bool = False
    notification_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_other_family(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        count = data.get("connection_count")
        if count is None:
            count = data.get("connections")
        if count is not None:
            data.setdefault("connection_count", count)
            data.setdefault("connections", count)
        if data.get("user_connected") is None:
            data["user_connected"] = bool(count)
        return data


class BatchNotificationRequest(BaseModel):
    """Send a notification to several users (1 to 1000).

    Two shapes are read: ours, one notification for ``user_ids``; django-ipc's,
    ``notifications`` (a list of :class:`NotificationRequest`). Ours is spelled out into
    ``notifications`` (both are written; django-ipc ignores our keys, our server reads
    ``notifications`` first), so :meth:`requests` gives the individual notifications either way.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    user_ids: list[str] = Field(default_factory=list, max_length=1000)
    notification_type: str | None = Field(
        default=None, min_length=1, max_length=128, validation_alias=AliasChoices("notification_type", "type")
    )
    title: str = Field(default="", max_length=1024)
    message: str = Field(default="", max_length=65536)
    priority: NotificationPriority = NotificationPriority.NORMAL
    data: dict[str, Any] = Field(default_factory=dict)
    notifications: list[NotificationRequest] = Field(default_factory=list, max_length=1000)

    @field_validator("user_ids", "notifications", mode="before")
    @classmethod
    def _null_lists(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("data", mode="before")
    @classmethod
    def _null_data(cls, value: Any) -> Any:
        return _none_as_empty_dict(value)

    @model_validator(mode="after")
    def _one_shape(self) -> BatchNotificationRequest:
        if not self.notifications and not self.user_ids:
            raise ValueError("give user_ids (with notification_type) or notifications")
        if self.user_ids and not self.notification_type:
            raise ValueError("user_ids needs notification_type")
        if not self.notifications:  # our shape: spelled out in django-ipc's, which is written too
            self.notifications = [
                NotificationRequest(
                    user_id=user_id,
                    notification_type=self.notification_type or "",
                    title=self.title,
                    message=self.message,
                    priority=self.priority,
                    data=self.data,
                )
                for user_id in dict.fromkeys(self.user_ids)
            ]
        return self

    def requests(self) -> list[NotificationRequest]:
        """The individual notifications (``user_ids`` are spelled out into ``notifications``
        when those are not given)."""
        return list(self.notifications)


class BatchNotificationResponse(BaseModel):
    """Per-batch counts, which users got it and which were offline, and (django-ipc's form) one
    :class:`NotificationResponse`-shaped dict per user in ``results``."""

    model_config = ConfigDict(extra="ignore")

    total: int = Field(ge=0)
    delivered: int = Field(ge=0)
    failed: int = Field(ge=0)
    delivered_user_ids: list[str] = Field(default_factory=list)
    offline_user_ids: list[str] = Field(default_factory=list)
    results: list[dict[str, Any]] = Field(default_factory=list)
