"""What older peers of the protocol can read: django-ipc 1.0.9 servers and browser clients, and
django-cfg's original ``WebSocketRPCClient``.

Those peers validate replies strictly: an error code outside their enum of thirteen values, or
an error text over 500 characters, becomes a parsing failure on their side instead of a remote
error. A caller that announces the ``error_details`` extension is one of ours and gets full
detail; every other caller gets what this module produces (:func:`legacy_error_code`,
:func:`legacy_error_text`). The reverse direction, reading what django-ipc sends, is
:func:`unwrap_legacy_error`.

Pure functions only (no I/O); :mod:`rpc_tasks.protocol` and the WebSocket dialects use them.
"""

from __future__ import annotations

import ast
import uuid

from .models.errors import RPCError, RPCErrorCode

#: The error codes older peers accept (their enum), as wire strings.
LEGACY_ERROR_CODES: frozenset[str] = frozenset(
    {
        "timeout",
        "method_not_found",
        "invalid_params",
        "validation_error",
        "unauthorized",
        "rate_limit_exceeded",
        "internal_error",
        "service_unavailable",
        "user_not_connected",
        "room_not_found",
        "resource_not_found",
        "connection_error",
        "redis_error",
    }
)

#: Our codes that older peers do not know, and the one of theirs that says the same.
_LEGACY_EQUIVALENT: dict[str, str] = {
    RPCErrorCode.INVALID_REQUEST.value: "invalid_params",
    RPCErrorCode.PAYLOAD_TOO_LARGE.value: "invalid_params",
}

#: Longest error text older peers accept (their ``RPCError.message`` limit).
LEGACY_MAX_ERROR_TEXT = 500

#: The correlation id of a reply whose request's id could not be read: older clients require a
#: UUID there, so "unknown" is the nil UUID.
UNKNOWN_CORRELATION_ID = str(uuid.UUID(int=0))


def legacy_error_code(error: RPCError) -> str:
    """``error``'s code as one of :data:`LEGACY_ERROR_CODES` (unknown ones: ``internal_error``)."""
    code = error.wire_code
    if code in LEGACY_ERROR_CODES:
        return code
    return _LEGACY_EQUIVALENT.get(error.code.value, RPCErrorCode.INTERNAL_ERROR.value)


def legacy_error_text(text: str | None, fallback: str = "remote call failed") -> str:
    """``text`` cut to at most :data:`LEGACY_MAX_ERROR_TEXT` characters, never empty."""
    text = (text or "").strip() or fallback
    if len(text) <= LEGACY_MAX_ERROR_TEXT:
        return text
    return text[: LEGACY_MAX_ERROR_TEXT - 3] + "..."


def legacy_correlation_id(value: str | None) -> str:
    """``value`` when it is a UUID older clients accept, else :data:`UNKNOWN_CORRELATION_ID`."""
    if value:
        try:
            uuid.UUID(value)
            return value
        except ValueError:
            pass
    return UNKNOWN_CORRELATION_ID


def unwrap_legacy_error(code: str | None, text: str | None) -> tuple[str | None, str | None]:
    """The real code and message of a django-ipc Streams error.

    django-ipc reports a handler's failure as ``internal_error`` whose text is the Python
    ``repr`` of the handler's error dict (``"{'code': 'validation_error', 'message': ...}"``).
    This reads that dict back (as a literal, never evaluated as code); any other input comes back
    unchanged.
    """
    if code != RPCErrorCode.INTERNAL_ERROR.value or not text or not text.startswith("{'code': '"):
        return code, text
    try:
        data = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return code, text
    if not isinstance(data, dict) or not isinstance(data.get("code"), str):
        return code, text
    message = data.get("message") if isinstance(data.get("message"), str) else text
    problems = data.get("validation_errors")
    if isinstance(problems, list) and problems:
        fields = [str(p.get("field")) + ": " + str(p.get("error")) for p in problems if isinstance(p, dict)]
        message = f"{message} ({'; '.join(fields)})" if fields else message
    return data["code"], message
