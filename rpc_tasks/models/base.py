"""Base message models shared by every RPC envelope.

These mirror the seed design's ``BaseRPCMessage`` / ``BaseRPCRequest`` / ``BaseRPCResponse``.
They are *wire* models: field names are part of the protocol (see :mod:`rpc_tasks.protocol`).
Parsing is lenient (unknown keys are ignored) so that newer peers can add fields; emitting is
strict (only the documented keys are written unless an extension was negotiated).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Method names allowed on the wire (``^[a-zA-Z0-9_.]+$``).
METHOD_NAME_RE = re.compile(r"[a-zA-Z0-9_.]+")

#: Largest per-request timeout (seconds) a request may carry.
MAX_REQUEST_TIMEOUT = 300


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def new_correlation_id() -> str:
    """Return a fresh correlation id (a UUID4 string)."""
    return str(uuid.uuid4())


class BaseRPCMessage(BaseModel):
    """Fields every RPC message carries: a correlation id and a UTC timestamp."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    correlation_id: str = Field(default_factory=new_correlation_id, min_length=1, max_length=128)
    timestamp: datetime = Field(default_factory=utcnow)

    @field_validator("timestamp")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class BaseRPCRequest(BaseRPCMessage):
    """A request: which method to run, where to reply and how long the caller waits.

    ``timeout`` is in whole seconds on the Streams wire (``0`` means fire-and-forget: no reply
    is expected and none is sent).
    """

    method: str = Field(min_length=1, max_length=256)
    reply_to: str | None = Field(default=None, max_length=512)
    timeout: int = Field(default=30, ge=0, le=MAX_REQUEST_TIMEOUT)

    @field_validator("method")
    @classmethod
    def _method_name(cls, value: str) -> str:
        if not METHOD_NAME_RE.fullmatch(value):
            raise ValueError("method must match ^[a-zA-Z0-9_.]+$")
        return value

    @property
    def is_fire_and_forget(self) -> bool:
        """True when the caller does not wait for a reply (``timeout == 0``)."""
        return self.timeout == 0


class BaseRPCResponse(BaseRPCMessage):
    """A response: success flag, and on failure a message and a snake_case error code."""

    success: bool
    error: str | None = None
    error_code: str | None = None

    def raise_for_error(self) -> None:
        """Raise :class:`~rpc_tasks.exceptions.RPCRemoteError` if this response is a failure."""
        if not self.success:
            from ..exceptions import RPCRemoteError
            from .errors import RPCError

            raise RPCRemoteError(RPCError.from_wire(self.error_code, self.error or "remote error"))


def dump_json_dict(model: BaseModel) -> dict[str, Any]:
    """Dump a model to a JSON-compatible dict (datetimes as ISO strings, enums as values)."""
    return model.model_dump(mode="json")
