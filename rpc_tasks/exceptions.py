"""Exceptions raised by rpc-tasks. All derive from :class:`RPCException`.

Params/result validation errors are Pydantic's own ``pydantic.ValidationError`` (as the seed
design says), so that ``except ValidationError`` works the way Pydantic users expect.
"""

from __future__ import annotations

from typing import Any

from .models.errors import RPCError, RPCErrorCode


class RPCException(Exception):
    """Base class of every exception raised by rpc-tasks."""


class RPCTimeoutError(RPCException):
    """No reply arrived within ``timeout_seconds`` for a call to ``method``."""

    def __init__(self, method: str, timeout_seconds: float, message: str | None = None) -> None:
        self.method = method
        self.timeout_seconds = timeout_seconds
        super().__init__(message or f"RPC call to {method!r} timed out after {timeout_seconds:g}s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.method, self.timeout_seconds, str(self)))


class RPCRemoteError(RPCException):
    """The remote side failed; ``error`` is the structured :class:`~rpc_tasks.models.RPCError`.

    Raise it from an ``@rpc_actor`` (or let it propagate from a nested RPC call) to send a
    typed error back to the caller::

        raise RPCRemoteError(RateLimitError(message="slow down", retry_after=2.5))
        raise RPCRemoteError.from_code("user_not_connected", "user 42 is offline")
    """

    def __init__(self, error: RPCError | str, message: str | None = None) -> None:
        if isinstance(error, str):
            error = RPCError.from_wire(error, message or error)
        self.error: RPCError = error
        super().__init__(str(error))

    @classmethod
    def from_code(
        cls,
        code: RPCErrorCode | str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> RPCRemoteError:
        """Build from a code and message (``retryable`` defaults from the code)."""
        code_str = code.value if isinstance(code, RPCErrorCode) else code
        return cls(
            RPCError.from_wire(
                code_str, message, retryable=retryable, retry_after=retry_after, details=details
            )
        )

    @property
    def code(self) -> RPCErrorCode:
        """Shortcut for ``error.code``."""
        return self.error.code

    @property
    def is_retryable(self) -> bool:
        """Whether retrying may succeed (from the error, or its code's default)."""
        return self.error.retryable

    @property
    def retry_after(self) -> float | None:
        """Seconds the remote asked us to wait before retrying, if it said."""
        return self.error.retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.error,))


class RPCConnectionError(RPCException):
    """Redis (or the broker) could not be reached or the connection broke mid-call."""


class RPCConfigurationError(RPCException):
    """Settings are missing or invalid (e.g. the broker lacks the reply middleware)."""


class RPCPayloadTooLargeError(RPCException, ValueError):
    """An encoded payload exceeds ``max_payload_bytes``; nothing was sent."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{what} is {size} bytes, over the {limit}-byte limit")


class RPCProtocolError(RPCException, ValueError):
    """A wire envelope could not be decoded (not JSON, wrong shape, too large)."""


class RequestDecodeError(RPCProtocolError):
    """A stream entry is not a valid request; ``reply_to``/``correlation_id`` are set when
    they could be read, so the server can still send an error reply."""

    def __init__(
        self,
        reason: str,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        wants_error_details: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        #: The request announced ``error_details`` (its error reply may carry our own codes).
        self.wants_error_details = wants_error_details
