"""A test double of django-cfg's original ``WebSocketRPCClient`` (``django_rpc_old``), written
from its specification (``/tmp/research/compat.md`` section C; no code of it is copied).

It is strict where that client is strict, so our servers are tested against the rules an
unchanged deployment of it enforces:

* requests: ``correlation_id`` a UUID4, ``reply_to = prefix + correlation_id`` (also for
  fire-and-forget), ``timeout`` whole seconds (0 = fire-and-forget), optional params written as
  explicit ``null``; ``XADD ... MAXLEN ~ 10000``, then ``BLPOP``; the reply key is deleted after;
* replies: no key besides ``correlation_id, timestamp, success, error, error_code, result``;
  ``correlation_id`` a UUID when present; ``error`` at most 1000 characters; ``error_code``
  ``^[a-z_]+$``; a failure becomes :class:`LegacyRemoteError` only if its code is one of the
  thirteen of :class:`LegacyErrorCode` and its text at most 500 characters, otherwise a
  ``pydantic.ValidationError`` escapes (what the real client does); a success with
  ``result: null`` is a remote error; ``result`` is validated by the caller's model;
* ``health_check()``: ``PING``, then ``echo`` ``{"message": "health_check"}`` read as
  :class:`EchoResult` (``echoed`` and ``length`` required); remote errors and timeouts count as
  healthy, any other failure (a result that does not parse) as unhealthy.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T", bound=BaseModel)


class LegacyErrorCode(str, Enum):
    TIMEOUT = "timeout"
    METHOD_NOT_FOUND = "method_not_found"
    INVALID_PARAMS = "invalid_params"
    VALIDATION_ERROR = "validation_error"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    INTERNAL_ERROR = "internal_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    USER_NOT_CONNECTED = "user_not_connected"
    ROOM_NOT_FOUND = "room_not_found"
    RESOURCE_NOT_FOUND = "resource_not_found"
    CONNECTION_ERROR = "connection_error"
    REDIS_ERROR = "redis_error"


class LegacyError(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    code: LegacyErrorCode
    message: str = Field(min_length=1, max_length=500)
    retryable: bool = False


class LegacyReply(BaseModel):
    """The reply envelope as that client parses it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=True)

    correlation_id: uuid.UUID = Field(default_factory=uuid.uuid4, alias="cid")
    timestamp: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    success: bool
    error: str | None = Field(default=None, max_length=1000)
    error_code: str | None = Field(default=None, max_length=50, pattern=r"^[a-z_]+$")
    result: dict[str, Any] | None = None


class LegacyTimeoutError(Exception):
    pass


class LegacyRemoteError(Exception):
    def __init__(self, error: LegacyError) -> None:
        super().__init__(f"RPC remote error [{error.code.value}]: {error.message}")
        self.error = error


# -- the models it sends and reads (django-ipc's, as specified) --------------------------------


class Priority(str, Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class NotificationRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    user_id: str = Field(min_length=1, max_length=100)
    type: str = Field(min_length=1, max_length=50, pattern=r"^[a-z_]+$")
    title: str = Field(min_length=1, max_length=200)
    message: str = Field(min_length=1, max_length=2000)
    priority: Priority = Priority.NORMAL
    data: dict[str, Any] | None = None
    expires_at: datetime | None = None


class NotificationResponse(BaseModel):
    user_id: str
    delivered: bool
    connections: int = Field(ge=0)
    error: str | None = None
    queued_for_later: bool = False


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    target: str = Field(pattern=r"^(all|room|user|users)$")
    type: str = Field(default="info", min_length=1, max_length=50, pattern=r"^[a-z_]+$")
    title: str = Field(min_length=1, max_length=200)
    message: str = Field(min_length=1, max_length=1000)
    room: str | None = None
    user_id: str | None = None
    user_ids: list[str] | None = None
    data: dict[str, Any] | None = None


class BroadcastResponse(BaseModel):
    target: str = Field(pattern=r"^(all|room|user|users)$")
    recipients: int = Field(ge=0)
    room: str | None = None
    user_id: str | None = None


class EchoParams(BaseModel):
    message: str = Field(min_length=1, max_length=1000)


class EchoResult(BaseModel):
    echoed: str
    length: int = Field(ge=0)


_METHOD = re.compile(r"^[a-zA-Z0-9_.]+$")


def parse_reply(raw: bytes | str, result_model: type[T]) -> T:
    """What the client does with a reply: the result, or :class:`LegacyRemoteError`, or a
    ``pydantic.ValidationError`` when the reply breaks its rules."""
    reply = LegacyReply.model_validate_json(raw)
    if not reply.success:
        text = reply.error if reply.error and reply.error.strip() else "Unknown error"
        error = LegacyError.model_validate({"code": reply.error_code or "internal_error", "message": text})
        raise LegacyRemoteError(error)
    if reply.result is None:
        raise LegacyRemoteError(
            LegacyError(
                code=LegacyErrorCode.INTERNAL_ERROR, message="Response success=True but result is None"
            )
        )
    return result_model.model_validate(reply.result)


class LegacyClient:
    """The client's behaviour over one Redis connection."""

    def __init__(
        self,
        redis_url: str,
        *,
        request_stream: str = "stream:requests",
        response_key_prefix: str = "list:response:",
        timeout: int = 30,
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.request_stream = request_stream
        self.prefix = response_key_prefix
        self.timeout = timeout
        self.sent: list[dict[str, Any]] = []

    def _envelope(self, method: str, params: BaseModel, timeout: int) -> tuple[str, bytes]:
        if not _METHOD.match(method) or len(method) > 100:
            raise ValueError(f"invalid method {method!r}")
        if not 0 <= timeout <= 300:
            raise ValueError("timeout must be 0..300")
        cid = str(uuid.uuid4())
        body = {
            "correlation_id": cid,
            "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "method": method,
            "reply_to": f"{self.prefix}{cid}",
            "timeout": timeout,
            "params": params.model_dump(mode="json"),
        }
        self.sent.append(body)
        return cid, json.dumps(body, separators=(",", ":")).encode()

    def call(self, method: str, params: BaseModel, result_model: type[T], timeout: int | None = None) -> T:
        timeout = timeout or self.timeout
        cid, payload = self._envelope(method, params, timeout)
        key = f"{self.prefix}{cid}"
        try:
            self.redis.xadd(self.request_stream, {"payload": payload}, maxlen=10000, approximate=True)
            got = self.redis.blpop([key], timeout)
            if got is None:
                raise LegacyTimeoutError(f"{method} timed out after {timeout}s")
            return parse_reply(got[1], result_model)
        finally:
            self.redis.delete(key)

    def fire_and_forget(self, method: str, params: BaseModel) -> str:
        _cid, payload = self._envelope(method, params, 0)
        entry = self.redis.xadd(self.request_stream, {"payload": payload}, maxlen=10000, approximate=True)
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def broadcast(self, channel: str, message: BaseModel) -> int:
        return int(self.redis.publish(channel, message.model_dump_json()))

    def health_check(self, timeout: int = 5) -> bool:
        try:
            self.redis.ping()
            result = self.call("echo", EchoParams(message="health_check"), EchoResult, timeout=timeout)
            return result.echoed == "health_check"
        except (LegacyTimeoutError, LegacyRemoteError):
            return True
        except Exception:  # ValidationError of a result that does not parse, among others
            return False

    def close(self) -> None:
        self.redis.close()
