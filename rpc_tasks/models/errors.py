"""Structured error models.

``RPCError`` is what travels back to a caller when a remote call fails. Its ``code`` is an
:class:`RPCErrorCode`; codes this version does not know (a newer peer) are mapped to
``INTERNAL_ERROR`` and the original string is kept in ``raw_code``, so parsing never crashes.

``retryable`` defaults from the code: ``timeout``, ``service_unavailable`` and
``rate_limit_exceeded`` are retryable, everything else is not. ``retry_after`` is in seconds
(float, millisecond precision).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RPCErrorCode(str, Enum):
    """Error codes, written on the wire as their snake_case value."""

    INTERNAL_ERROR = "internal_error"
    VALIDATION_ERROR = "validation_error"
    METHOD_NOT_FOUND = "method_not_found"
    TIMEOUT = "timeout"
    USER_NOT_CONNECTED = "user_not_connected"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # Codes of django-ipc's enum (read from its peers; see rpc_tasks.compat).
    INVALID_PARAMS = "invalid_params"
    UNAUTHORIZED = "unauthorized"
    ROOM_NOT_FOUND = "room_not_found"
    RESOURCE_NOT_FOUND = "resource_not_found"
    CONNECTION_ERROR = "connection_error"
    REDIS_ERROR = "redis_error"


#: Codes that are retryable unless the error says otherwise.
DEFAULT_RETRYABLE_CODES: frozenset[RPCErrorCode] = frozenset(
    {RPCErrorCode.TIMEOUT, RPCErrorCode.SERVICE_UNAVAILABLE, RPCErrorCode.RATE_LIMIT_EXCEEDED}
)


def parse_error_code(raw: str | RPCErrorCode | None) -> tuple[RPCErrorCode, str | None]:
    """Map a wire code to ``(RPCErrorCode, raw_code_if_unknown)``; never raises."""
    if isinstance(raw, RPCErrorCode):
        return raw, None
    if raw is None:
        return RPCErrorCode.INTERNAL_ERROR, None
    text = str(raw)
    try:
        return RPCErrorCode(text.lower()), None
    except ValueError:
        return RPCErrorCode.INTERNAL_ERROR, text


class RPCError(BaseModel):
    """A structured remote error: code, message, retryability, retry hint and details."""

    model_config = ConfigDict(extra="ignore")

    code: RPCErrorCode = RPCErrorCode.INTERNAL_ERROR
    message: str = Field(default="", max_length=16384)
    retryable: bool = False
    retry_after: float | None = Field(
        default=None, ge=0, le=1e9, allow_inf_nan=False, description="seconds before a retry"
    )
    details: dict[str, Any] = Field(default_factory=dict)
    raw_code: str | None = Field(default=None, description="the peer's code when it is unknown here")

    @model_validator(mode="before")
    @classmethod
    def _lenient_code_and_default_retryable(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "code" in data and not isinstance(data["code"], RPCErrorCode):
            code, raw = parse_error_code(data["code"])
            data["code"] = code
            if raw is not None and not data.get("raw_code"):
                data["raw_code"] = raw
        if data.get("retryable") is None:
            code = data.get("code", cls.model_fields["code"].default)
            data["retryable"] = code in DEFAULT_RETRYABLE_CODES
        return data

    @property
    def wire_code(self) -> str:
        """The code as written on the wire (the peer's raw code is preserved)."""
        return self.raw_code or self.code.value

    @classmethod
    def from_wire(
        cls,
        code: str | None,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> RPCError:
        """Build an error from wire fields, tolerating unknown codes."""
        data: dict[str, Any] = {"code": code, "message": message, "details": details or {}}
        if retryable is not None:
            data["retryable"] = retryable
        if retry_after is not None:
            data["retry_after"] = retry_after
        return cls.model_validate(data)

    def __str__(self) -> str:
        hint = f", retry_after={self.retry_after:g}s" if self.retry_after is not None else ""
        return f"[{self.wire_code}] {self.message}{hint}"


class RPCValidationError(RPCError):
    """Params (or a result) did not match their model; ``details['errors']`` lists the fields."""

    code: RPCErrorCode = RPCErrorCode.VALIDATION_ERROR

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Field errors as produced by Pydantic (``loc``, ``msg``, ``type``)."""
        value = self.details.get("errors", [])
        return value if isinstance(value, list) else []


class TimeoutError(RPCError):  # the seed's name; also exported as TimeoutErrorModel
    """The remote side gave up (or the caller's deadline passed). Retryable by default."""

    code: RPCErrorCode = RPCErrorCode.TIMEOUT
    timeout_seconds: float | None = None


class UserNotConnectedError(RPCError):
    """The target user has no live WebSocket connection."""

    code: RPCErrorCode = RPCErrorCode.USER_NOT_CONNECTED
    user_id: str | None = None


class RateLimitError(RPCError):
    """The remote is rate limiting; wait ``retry_after`` seconds. Retryable by default."""

    code: RPCErrorCode = RPCErrorCode.RATE_LIMIT_EXCEEDED
    limit: int | None = None
    window_seconds: float | None = None


TimeoutErrorModel = TimeoutError
