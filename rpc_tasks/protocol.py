"""The wire format, in one place: reply keys, Dramatiq message options, JSON envelopes.

Every other module (actor, middleware, Streams client and server) goes through these
functions; none builds a reply key or an envelope by hand (each feature's own Redis keys are
built in its store: :mod:`rpc_tasks.redis.ratestore`, :mod:`rpc_tasks.websocket.store`).
JSON only, never pickle, with a size limit.

Response envelope (what a worker/server ``LPUSH``es to ``reply_to``)::

    {"correlation_id": "...", "timestamp": "2026-01-01T00:00:00Z", "success": true,
     "result": {...} | null, "error": "message" | null, "error_code": "snake_case" | null}

Extension ``error_details`` (only when the requester announced it; ``@rpc_actor`` callers always
do) adds one key, so that strict peers that do not know it never see it::

    "error_details": {"retryable": bool, "retry_after": float | null, "details": {...}}
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ValidationError

from . import compat
from .exceptions import (
    RequestDecodeError as RequestDecodeError,
)
from .exceptions import (
    RPCConnectionError,
    RPCPayloadTooLargeError,
    RPCProtocolError,
    RPCRemoteError,
    RPCTimeoutError,
)
from .models.base import MAX_REQUEST_TIMEOUT as MAX_REQUEST_TIMEOUT
from .models.base import METHOD_NAME_RE as METHOD_NAME_RE
from .models.errors import (
    RPCError,
    RPCErrorCode,
    RPCValidationError,
    TimeoutError,
    parse_error_code,
)

#: Name of the structured-error extension a requester may announce.
ERROR_DETAILS_EXTENSION = "error_details"

#: Dramatiq message option: the Redis list the worker pushes the reply to.
OPTION_REPLY_TO = "rpc_reply_to"
#: Dramatiq message option: the caller's deadline, Unix epoch seconds (float).
OPTION_DEADLINE = "rpc_deadline"
#: Dramatiq message option: how many times a worker has started processing this message.
OPTION_ATTEMPT = "rpc_attempt"

#: Dramatiq message option: total milliseconds this message was postponed (cooldowns, limits).
OPTION_POSTPONED_MS = "rpc_postponed_ms"
#: Dramatiq message option: the message holds a reserved slot of a proactive rate limit.
OPTION_RATE_SLOT = "rpc_rate_slot"

#: Largest error message we put on the wire (longer ones are truncated).
MAX_ERROR_MESSAGE = 4000

_JSON_SEPARATORS = (",", ":")
_WHITESPACE = re.compile(r"\s")
#: Built once: ``json.dumps`` with non-default options builds an encoder per call.
_STRICT_JSON = json.JSONEncoder(separators=_JSON_SEPARATORS, ensure_ascii=False, allow_nan=False)


# -- keys --------------------------------------------------------------------------------------


def reply_key(prefix: str, correlation_id: str) -> str:
    """Reply list key for a call: ``response_key_prefix + correlation_id``."""
    if not correlation_id or _WHITESPACE.search(correlation_id):
        raise ValueError(f"invalid correlation id {correlation_id!r}")
    return f"{prefix}{correlation_id}"


def is_reply_key(prefix: str, key: str) -> bool:
    """True when ``key`` is a reply key under ``prefix`` (used to refuse stray reply addresses)."""
    return key.startswith(prefix) and len(key) > len(prefix) and len(key) <= 512


# -- helpers -----------------------------------------------------------------------------------


def now_iso() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix (millisecond precision)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(data: Any, *, max_bytes: int | None = None, what: str = "payload") -> bytes:
    """Serialize to compact UTF-8 JSON, enforcing ``max_bytes``."""
    try:
        raw = _STRICT_JSON.encode(data).encode()
    except (TypeError, ValueError) as exc:
        raise RPCProtocolError(f"{what} is not JSON-serializable: {exc}") from exc
    if max_bytes is not None and len(raw) > max_bytes:
        raise RPCPayloadTooLargeError(len(raw), max_bytes, what)
    return raw


def loads(data: bytes | str, *, max_bytes: int | None = None, what: str = "payload") -> Any:
    """Parse JSON, enforcing ``max_bytes``; raises :class:`RPCProtocolError` on garbage."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if max_bytes is not None and size > max_bytes:
        raise RPCPayloadTooLargeError(size, max_bytes, what)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RPCProtocolError(f"{what} is not valid JSON: {type(exc).__name__}") from None


def model_to_wire(model: BaseModel | Mapping[str, Any] | None) -> Any:
    """JSON-compatible form of a params/result model (``None`` stays ``None``)."""
    if model is None:
        return None
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json")
    return dict(model)


def validation_error_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic field errors in a JSON-safe form, without input values (they may be secret)."""
    out: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": err.get("msg", ""),
                "type": err.get("type", ""),
            }
        )
    return out


def clean_text(text: str) -> str:
    """``text`` made safe for UTF-8 JSON (lone surrogates replaced)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _truncate(text: str) -> str:
    text = clean_text(text)
    return text if len(text) <= MAX_ERROR_MESSAGE else text[: MAX_ERROR_MESSAGE - 3] + "..."


def error_from_exception(exc: BaseException) -> RPCError:
    """Map any exception to the structured :class:`RPCError` that goes back to the caller."""
    if isinstance(exc, RPCRemoteError):
        return exc.error
    if isinstance(exc, ValidationError):
        errors = validation_error_details(exc)
        fields = "; ".join(f"{'.'.join(e['loc']) or '(root)'}: {e['msg']}" for e in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        return RPCValidationError(
            message=_truncate(f"{exc.error_count()} validation error(s) for {exc.title}: {fields}{more}"),
            details={"errors": errors},
        )
    if isinstance(exc, RPCTimeoutError):
        return TimeoutError(message=_truncate(str(exc)), timeout_seconds=exc.timeout_seconds)
    if isinstance(exc, RPCConnectionError):
        return RPCError(code=RPCErrorCode.SERVICE_UNAVAILABLE, message=_truncate(str(exc)))
    if isinstance(exc, RPCPayloadTooLargeError):
        return RPCError(code=RPCErrorCode.PAYLOAD_TOO_LARGE, message=_truncate(str(exc)))
    name = type(exc).__name__
    if name == "TimeLimitExceeded":  # dramatiq.middleware.TimeLimitExceeded
        return TimeoutError(message="the actor exceeded its time limit")
    if name == "ActorNotFound":  # dramatiq.errors.ActorNotFound
        return RPCError(code=RPCErrorCode.METHOD_NOT_FOUND, message=_truncate(f"unknown actor: {exc}"))
    text = str(exc)
    return RPCError(
        code=RPCErrorCode.INTERNAL_ERROR,
        message=_truncate(f"{name}: {text}" if text else name),
        details={"exception": name},
    )


# -- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """A decoded response envelope."""

    correlation_id: str
    success: bool
    result: Any
    error: RPCError | None
    timestamp: str | None = None

    def raise_for_error(self) -> None:
        """Raise :class:`RPCRemoteError` carrying the structured error if this is a failure."""
        if not self.success:
            raise RPCRemoteError(self.error or RPCError(message="remote call failed"))


def encode_response(
    correlation_id: str,
    *,
    result: BaseModel | Mapping[str, Any] | None = None,
    error: RPCError | None = None,
    extended: bool = True,
    max_bytes: int | None = None,
) -> bytes:
    """Encode a success (``error is None``) or failure response.

    When the success payload is over ``max_bytes`` a ``payload_too_large`` failure is encoded
    instead, so the caller always gets an answer.
    """
    envelope: dict[str, Any] = {
        "correlation_id": correlation_id,
        "timestamp": now_iso(),
        "success": error is None,
        "result": None,
        "error": None,
        "error_code": None,
    }
    if error is None:
        envelope["result"] = model_to_wire(result)
        if envelope["result"] is None and not extended:
            envelope["result"] = {}  # older clients read a null result as a failure
        try:
            return dumps(envelope, max_bytes=max_bytes, what="result")
        except (RPCPayloadTooLargeError, RPCProtocolError) as exc:
            error = error_from_exception(exc)
            envelope.update(success=False, result=None)
    if extended:
        envelope["error"] = _truncate(error.message or error.wire_code)
        envelope["error_code"] = error.wire_code
    else:  # an older peer: its own codes and text limit (rpc_tasks.compat)
        envelope["error"] = compat.legacy_error_text(clean_text(error.message), error.wire_code)
        envelope["error_code"] = compat.legacy_error_code(error)
    if extended:
        envelope[ERROR_DETAILS_EXTENSION] = {
            "retryable": error.retryable,
            "retry_after": error.retry_after,
            "details": error.details,
        }
    try:
        return dumps(envelope, max_bytes=max_bytes, what="error response")
    except (RPCPayloadTooLargeError, RPCProtocolError):
        envelope.pop(ERROR_DETAILS_EXTENSION, None)
        if extended:
            envelope[ERROR_DETAILS_EXTENSION] = {
                "retryable": error.retryable,
                "retry_after": error.retry_after,
                "details": {},
            }
        return dumps(envelope, what="error response")


def decode_response(data: bytes | str, *, max_bytes: int | None = None) -> Response:
    """Decode a response envelope (with or without the ``error_details`` extension)."""
    obj = loads(data, max_bytes=max_bytes, what="response")
    if not isinstance(obj, dict) or not isinstance(obj.get("success"), bool):
        raise RPCProtocolError("response is not an object with a boolean 'success'")
    correlation_id = obj.get("correlation_id")
    if not isinstance(correlation_id, str):
        raise RPCProtocolError("response has no correlation_id")
    timestamp = obj.get("timestamp") if isinstance(obj.get("timestamp"), str) else None
    if obj["success"]:
        return Response(correlation_id, True, obj.get("result"), None, timestamp)
    ext = obj.get(ERROR_DETAILS_EXTENSION)
    retryable: bool | None = None
    retry_after: float | None = None
    details: dict[str, Any] = {}
    if isinstance(ext, dict):
        if isinstance(ext.get("retryable"), bool):
            retryable = ext["retryable"]
        ra = ext.get("retry_after")
        if isinstance(ra, (int, float)) and not isinstance(ra, bool):
            try:
                value = float(ra)
            except OverflowError:
                value = math.inf
            if math.isfinite(value) and 0 <= value <= 1e9:
                retry_after = value
        if isinstance(ext.get("details"), dict):
            details = ext["details"]
    raw_code, message = compat.unwrap_legacy_error(
        obj.get("error_code") if isinstance(obj.get("error_code"), str) else None,
        obj.get("error") if isinstance(obj.get("error"), str) else None,
    )
    code, unknown = parse_error_code(clean_text(raw_code)[:128] if isinstance(raw_code, str) else None)
    try:
        error = RPCError(
            code=code,
            message=_truncate(message if isinstance(message, str) else "remote call failed"),
            retryable=retryable,  # None -> default from the code
            retry_after=retry_after,
            details=details,
            raw_code=unknown,
        )
        if code is RPCErrorCode.VALIDATION_ERROR:
            error = RPCValidationError.model_validate(error.model_dump())
    except ValidationError as exc:
        raise RPCProtocolError(f"response error fields are invalid: {exc.error_count()} error(s)") from None
    return Response(correlation_id, False, None, error, timestamp)


# -- requests (Redis Streams) -----------------------------------------------------------------

#: The one stream field that carries a request.
REQUEST_FIELD = "payload"
#: Request key in which a client lists the extensions it understands.
EXTENSIONS_KEY = "extensions"
#: Extension ``trace_context``: the request carries the caller's W3C trace context (a
#: ``{"traceparent": ..., "tracestate": ...}`` object under the same key). Sent only by clients
#: that announce extensions at all (``announce_extensions``), i.e. never to servers that
#: reject unknown request keys; servers that ignore unknown keys just ignore it.
TRACE_CONTEXT_EXTENSION = "trace_context"
#: Most keys a trace context may have (each key + value at most 1024 characters); anything
#: bigger or malformed is ignored.
_MAX_TRACE_CONTEXT = 8


@dataclass(frozen=True)
class Request:
    """A decoded request envelope."""

    correlation_id: str
    timestamp: datetime
    method: str
    reply_to: str | None
    timeout: int
    params: dict[str, Any]
    extensions: frozenset[str] = frozenset()
    #: The caller's W3C trace context (``traceparent``/``tracestate``), or ``None``.
    trace_context: dict[str, str] | None = None

    @property
    def is_fire_and_forget(self) -> bool:
        """``timeout == 0``: nobody waits, no reply is sent."""
        return self.timeout == 0

    @property
    def wants_error_details(self) -> bool:
        """The client understands the ``error_details`` response extension."""
        return ERROR_DETAILS_EXTENSION in self.extensions

    def expired(self, now: datetime | None = None) -> bool:
        """True when ``timestamp + timeout`` lies in the past (never for fire-and-forget)."""
        if self.timeout == 0:
            return False
        now = now or datetime.now(timezone.utc)
        return (now - self.timestamp).total_seconds() > self.timeout


def wire_timeout(timeout: float) -> int:
    """Seconds for the request's integer ``timeout`` field (rounded up, 1..300)."""
    return max(1, min(MAX_REQUEST_TIMEOUT, math.ceil(timeout)))


def encode_request(
    method: str,
    params: BaseModel | Mapping[str, Any],
    *,
    reply_to: str,
    timeout: int,
    correlation_id: str,
    extensions: frozenset[str] | set[str] | tuple[str, ...] = (),
    max_bytes: int | None = None,
    trace_context: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a request envelope (validated: method name, timeout range, size).

    ``trace_context`` is added (with the ``trace_context`` extension) only together with other
    ``extensions``: a client that announces none talks to a strict server."""
    if not isinstance(method, str) or not METHOD_NAME_RE.fullmatch(method) or len(method) > 256:
        raise ValueError(f"invalid method name {method!r}: must match ^[a-zA-Z0-9_.]+$")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_REQUEST_TIMEOUT:
        raise ValueError(f"timeout must be an int between 0 and {MAX_REQUEST_TIMEOUT}, got {timeout!r}")
    envelope: dict[str, Any] = {
        "correlation_id": correlation_id,
        "timestamp": now_iso(),
        "method": method,
        "reply_to": reply_to,
        "timeout": timeout,
        "params": model_to_wire(params),
    }
    if extensions:
        if trace_context:
            envelope[TRACE_CONTEXT_EXTENSION] = dict(trace_context)
            extensions = {*extensions, TRACE_CONTEXT_EXTENSION}
        envelope[EXTENSIONS_KEY] = sorted(extensions)
    return dumps(envelope, max_bytes=max_bytes, what=f"request for {method!r}")


def _parse_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def decode_request(data: bytes | str | None, *, max_bytes: int | None = None) -> Request:
    """Decode and check a request envelope; raises :class:`RequestDecodeError`."""
    if data is None:
        raise RequestDecodeError(f"stream entry has no {REQUEST_FIELD!r} field")
    try:
        obj = loads(data, max_bytes=max_bytes, what="request")
    except RPCPayloadTooLargeError as exc:
        raise RequestDecodeError(str(exc)) from None
    except RPCProtocolError as exc:
        raise RequestDecodeError(str(exc)) from None
    if not isinstance(obj, dict):
        raise RequestDecodeError("request is not a JSON object")
    reply_to = obj.get("reply_to") if isinstance(obj.get("reply_to"), str) else None
    cid = obj.get("correlation_id")
    correlation_id = cid if isinstance(cid, str) and 0 < len(cid) <= 128 else None

    raw_ext = obj.get(EXTENSIONS_KEY, [])
    extensions = (
        frozenset(x for x in raw_ext if isinstance(x, str)) if isinstance(raw_ext, list) else frozenset()
    )

    def bad(reason: str) -> RequestDecodeError:
        return RequestDecodeError(reason, reply_to, correlation_id, ERROR_DETAILS_EXTENSION in extensions)

    if correlation_id is None:
        raise bad("correlation_id must be a non-empty string")
    method = obj.get("method")
    if not isinstance(method, str) or len(method) > 256 or not METHOD_NAME_RE.fullmatch(method):
        raise bad("method must be a string matching ^[a-zA-Z0-9_.]+$")
    timeout = obj.get("timeout")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_REQUEST_TIMEOUT:
        raise bad(f"timeout must be an integer between 0 and {MAX_REQUEST_TIMEOUT}")
    timestamp = _parse_timestamp(obj.get("timestamp"))
    if timestamp is None:
        raise bad("timestamp must be an ISO-8601 date-time")
    if "reply_to" in obj and obj["reply_to"] is not None and reply_to is None:
        raise bad("reply_to must be a string")
    if timeout > 0 and not reply_to:
        raise bad("a request with timeout > 0 needs reply_to")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad("params must be a JSON object")
    return Request(
        correlation_id, timestamp, method, reply_to, timeout, params, extensions, _trace_context(obj)
    )


def _trace_context(obj: dict[str, Any]) -> dict[str, str] | None:
    """The request's trace context if well-formed (small, strings only); else ``None``: a bad
    trace context never costs the request."""
    raw = obj.get(TRACE_CONTEXT_EXTENSION)
    if not isinstance(raw, dict) or not raw or len(raw) > _MAX_TRACE_CONTEXT:
        return None
    if all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 1024 for k, v in raw.items()):
        return raw
    return None


# -- deadlines ---------------------------------------------------------------------------------


def check_timeout(timeout: Any, default: float) -> float:
    """A caller's timeout in seconds (``None`` means ``default``); raises ``ValueError``
    unless it is a positive number."""
    if timeout is None:
        timeout = default
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def deadline_from_timeout(timeout: float, now: float | None = None) -> float:
    """Absolute deadline (epoch seconds) for a call that waits ``timeout`` seconds."""
    return (time.time() if now is None else now) + timeout


def deadline_passed(deadline: Any, now: float | None = None) -> bool:
    """True when ``deadline`` (epoch seconds; anything else means "none") lies in the past."""
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        return False
    return (time.time() if now is None else now) > float(deadline)
