"""Broadcast models: one event to many users (everyone, a room, one user or a list of users).

Both families are read: ours (``event_type``, ``payload``, ``exclude_user_ids``) and
django-ipc's (``type``, ``data``, ``title``, ``message``, ``target="user"`` with ``user_id``).
What we write carries both names, and ``title``/``message`` always (django-ipc requires them),
so a django-ipc server and ours both accept it.
"""

from __future__ import annotations

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


class BroadcastTarget(str, Enum):
    """Who receives a broadcast."""

    ALL = "all"
    ROOM = "room"
    USER = "user"
    USERS = "users"


class BroadcastRequest(BaseModel):
    """Broadcast ``event_type``/``payload`` to ``target`` (``room``, ``user_id`` or ``user_ids``
    as needed).

    ``event_type`` is also read from django-ipc's ``type`` (default ``"info"``, as there) and
    ``payload`` from ``data``; ``title`` and ``message`` are the human-readable text (django-ipc
    browsers show ``message``; they default to ``event_type`` and ``title``). Unknown keys are
    ignored and ``null`` stands for "not given".
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    target: BroadcastTarget = BroadcastTarget.ALL
    event_type: str = Field(
        default="info", min_length=1, max_length=128, validation_alias=AliasChoices("event_type", "type")
    )
    payload: dict[str, Any] = Field(default_factory=dict, validation_alias=AliasChoices("payload", "data"))
    title: str | None = Field(default=None, max_length=1024)
    message: str | None = Field(default=None, max_length=65536)
    room: str | None = Field(default=None, max_length=256)
    user_id: str | None = Field(default=None, max_length=256)
    user_ids: list[str] = Field(default_factory=list, max_length=10000)
    exclude_user_ids: list[str] = Field(default_factory=list)

    @field_validator("payload", mode="before")
    @classmethod
    def _null_payload(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("user_ids", "exclude_user_ids", mode="before")
    @classmethod
    def _null_lists(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("target", "event_type", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="after")
    def _target_fields(self) -> BroadcastRequest:
        if self.target is BroadcastTarget.ROOM and not self.room:
            raise ValueError("target='room' needs a room name")
        if self.target is BroadcastTarget.USER and not self.user_id:
            raise ValueError("target='user' needs a user_id")
        if self.target is BroadcastTarget.USERS and not self.user_ids:
            raise ValueError("target='users' needs at least one user id")
        # django-ipc requires both texts; default them so that what we write is accepted there
        self.title = self.title or self.event_type
        self.message = self.message or self.title
        return self

    @property
    def text(self) -> str:
        """What a reader sees: ``message``, else ``title``, else ``event_type``."""
        return self.message or self.title or self.event_type

    def recipients(self) -> list[str] | None:
        """The user ids a ``user``/``users`` broadcast goes to (``None`` for ``all``/``room``)."""
        if self.target is BroadcastTarget.USER:
            return [self.user_id or ""]
        if self.target is BroadcastTarget.USERS:
            return list(self.user_ids)
        return None

    @model_serializer(mode="wrap")
    def _both_names(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "event_type" in data:
            data["type"] = data["event_type"]
        if "payload" in data:
            data["data"] = data["payload"]
        if data.get("user_ids") == []:
            data["user_ids"] = None  # django-ipc: a list must hold at least one id
        return data


class BroadcastResponse(BaseModel):
    """How many sockets/users a broadcast reached (with django-ipc's ``target``, ``room``,
    ``user_id`` echoed back)."""

    model_config = ConfigDict(extra="ignore")

    target: BroadcastTarget = BroadcastTarget.ALL
    recipients: int = Field(ge=0, description="sockets that took the frame")
    users: int = Field(default=0, ge=0)
    room: str | None = None
    user_id: str | None = None
