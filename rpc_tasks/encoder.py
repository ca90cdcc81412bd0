"""A Dramatiq JSON encoder that never turns a structurally bad message into a crash loop.

Dramatiq's ``Message.decode`` raises ``DecodeError`` when a message is valid JSON but not a
valid message (missing fields, ``args`` not a list, ...). On the Redis broker that exception
escapes the consumer, which restarts, while the message stays in the worker's ack set and is
redelivered later to fail again; a ``.call()`` caller waits until its timeout.

:class:`RPCJSONEncoder` decodes such a message into a placeholder addressed to the reserved
actor name :data:`UNDECODABLE_ACTOR`, keeping its id, queue and options (so the broker can
still nack it and the caller's reply address is known). ``RPCReplies`` fails it at once: it is
dead-lettered with the reason, and a ``.call()`` caller gets an ``invalid_request`` reply.
Options a worker would trip over (``throws`` or ``retry_when`` from the wire, ``retries: "x"``,
``retry_codes: 5``, a ``pipe_target`` that is not a message, ...) make a message invalid too
(:func:`message_problem`). Bytes that are not JSON at all still raise ``DecodeError`` as in
Dramatiq; ``BlockingRedisBroker``'s consumer dead-letters those itself, with an error reply to
the reply address it can still read in the raw bytes (:func:`salvage_reply_address`).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.encoder import JSONEncoder

#: Actor name of the placeholder a structurally invalid message is decoded into.
UNDECODABLE_ACTOR = "rpc_tasks.undecodable"
#: Message option holding why a message could not be decoded.
OPTION_DECODE_ERROR = "rpc_decode_error"

#: Dramatiq's message JSON (compact, ASCII-escaped), with the encoder built once rather than per
#: message as ``json.dumps(..., separators=...)`` does.
_JSON = json.JSONEncoder(separators=(",", ":"))

_FIELDS = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
    "message_timestamp": int,
}


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _codes(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(c, str) for c in value))


def _optional_count(value: Any) -> bool:
    return value is None or _count(value)


def _optional_number(value: Any) -> bool:
    return value is None or _number(value)


def _absent(value: Any) -> bool:
    return value is None


#: Message options the worker side reads, and what each must be on the wire. ``throws`` and
#: ``retry_when`` are Python objects (an exception class, a callable): they only ever come from
#: the actor's declaration, never from a message.
_OPTION_CHECKS: dict[str, tuple[Any, str]] = {
    "redis_message_id": (_text, "a string"),
    "retries": (_count, "a non-negative integer"),
    "max_retries": (_optional_count, "a non-negative integer or null"),
    "min_backoff": (_number, "a non-negative number"),
    "max_backoff": (_number, "a non-negative number"),
    "jitter": (_number, "a non-negative number"),
    "retry_codes": (_codes, "a list of strings or null"),
    "max_postpone": (_optional_number, "a non-negative number or null"),
    "time_limit": (_optional_number, "a non-negative number or null"),
    "max_age": (_optional_number, "a non-negative number or null"),
    "on_retry_exhausted": (_text, "an actor name"),
    "on_success": (_text, "an actor name"),
    "on_failure": (_text, "an actor name"),
    "throws": (_absent, "absent (it is an exception class, declared on the actor)"),
    "retry_when": (_absent, "absent (it is a callable, declared on the actor)"),
    "rpc_reply_to": (_text, "a string"),
    "rpc_deadline": (_number, "a number"),
    "rpc_attempt": (_count, "a non-negative integer"),
    "rpc_postponed_ms": (_number, "a non-negative number"),
    "idempotency_key": (_text, "a string"),
    "idempotent": (_absent, "absent (it is declared on the actor)"),
}


def options_problem(options: dict[str, Any]) -> str | None:
    """Why a message's options would trip the worker (``None``: they are fine)."""
    for name, (check, expected) in _OPTION_CHECKS.items():
        if name in options and not check(options[name]):
            return f"option {name!r} must be {expected}, got {type(options[name]).__name__}"
    target = options.get("pipe_target")
    if target is not None and _problem(target) is not None:
        return "option 'pipe_target' must be a message"
    return None


def message_problem(obj: Any) -> str | None:
    """Why decoded JSON ``obj`` is not a message a worker can process (``None``: it is)."""
    problem = _problem(obj)
    if problem is None:
        problem = options_problem(obj["options"])
    return problem


def placeholder_fields(
    reason: str,
    *,
    queue_name: str,
    message_id: str | None = None,
    reply_to: Any = None,
    redis_message_id: str | None = None,
) -> dict[str, Any]:
    """The fields of the placeholder message an unprocessable message becomes: addressed to
    :data:`UNDECODABLE_ACTOR`, with only the options the dead-letter path needs (the reason,
    the reply address when it is a string, the broker's id)."""
    options: dict[str, Any] = {OPTION_DECODE_ERROR: reason}
    if isinstance(reply_to, str):
        options["rpc_reply_to"] = reply_to
    if redis_message_id is not None:
        options["redis_message_id"] = redis_message_id
    return {
        "queue_name": queue_name,
        "actor_name": UNDECODABLE_ACTOR,
        "args": [],
        "kwargs": {},
        "options": options,
        "message_id": message_id if isinstance(message_id, str) else str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }


_REPLY_TO_RE = re.compile(rb'"rpc_reply_to"\s*:\s*"([^"\\]{1,512})"')
_MESSAGE_ID_RE = re.compile(rb'"message_id"\s*:\s*"([^"\\]{1,512})"')


def _last_string(data: bytes, pattern: re.Pattern[bytes]) -> str | None:
    # Options follow args in Dramatiq's field order: the last occurrence is the option.
    found = None
    for match in pattern.finditer(data):
        found = match
    if found is None:
        return None
    try:
        return found.group(1).decode("ascii")
    except UnicodeDecodeError:
        return None


def salvage_reply_address(data: bytes) -> tuple[str | None, str | None]:
    """``(message_id, rpc_reply_to)`` read straight from the raw bytes of a message that cannot
    be decoded (not JSON, or too large to decode), so its caller can still get an error reply.
    Either is ``None`` when not found; the reply address still has to pass the reply-prefix
    check before anything is pushed to it."""
    return _last_string(data, _MESSAGE_ID_RE), _last_string(data, _REPLY_TO_RE)


def _problem(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"a message must be a JSON object, got {type(obj).__name__}"
    for name, kind in _FIELDS.items():
        if name not in obj:
            return f"field {name!r} is missing"
        if not isinstance(obj[name], kind) or (kind is int and isinstance(obj[name], bool)):
            return f"field {name!r} must be {kind.__name__}"
    if len(obj) != len(_FIELDS):  # every field is there: anything more is extra
        return f"unknown fields: {sorted(set(obj) - set(_FIELDS))}"
    return None


class RPCJSONEncoder(JSONEncoder):
    """Dramatiq's ``JSONEncoder`` plus salvage of valid-JSON-but-invalid messages."""

    def encode(self, data: Any) -> bytes:
        """Same bytes as Dramatiq's ``JSONEncoder.encode``."""
        return _JSON.encode(data).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        """Dramatiq's decode; a JSON object that is *meant* as a message (it has at least one
        of a message's fields) but is not a valid one becomes a placeholder addressed to
        :data:`UNDECODABLE_ACTOR`. Anything else is returned as decoded: the same global
        encoder decodes results for Dramatiq's ``Results`` backends, which are not messages."""
        obj = super().decode(data)
        if not isinstance(obj, dict) or not obj.keys() & _FIELDS.keys():
            return obj
        problem = message_problem(obj)
        if problem is None:
            return dict(obj)
        src: dict[str, Any] = obj if isinstance(obj, dict) else {}
        raw_options = src.get("options")
        options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        queue = str(src["queue_name"]) if isinstance(src.get("queue_name"), str) else "default"
        rid = options.get("redis_message_id")
        return placeholder_fields(
            problem,
            queue_name=queue,
            message_id=src.get("message_id"),
            reply_to=options.get("rpc_reply_to"),
            redis_message_id=rid if isinstance(rid, str) else None,
        )


class RedactedMessageProxy(MessageProxy):
    """A ``MessageProxy`` whose ``str``/``repr`` name the actor and message id but not the
    params: Dramatiq formats messages into its log lines ("Failed to process message %s ...",
    "Message %s was skipped."), and params may hold secrets. Used unless ``log_rpc_params``
    is on."""

    def __str__(self) -> str:
        return f"{self.actor_name}(<params not logged>) [{self.message_id}]"

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.actor_name} {self.message_id}>"


_REDACTED_CLASSES: dict[type, type] = {MessageProxy: RedactedMessageProxy}


def redact_message_proxy(message: Any) -> None:
    """Make ``message`` (a ``MessageProxy`` of any broker, e.g. RabbitMQ's subclass) print
    like :class:`RedactedMessageProxy`, in place (its class becomes a redacting subclass of its
    own class)."""
    cls = type(message)
    if isinstance(message, RedactedMessageProxy) or not isinstance(message, MessageProxy):
        return
    redacted = _REDACTED_CLASSES.get(cls)
    if redacted is None:
        redacted = _REDACTED_CLASSES[cls] = type(f"Redacted{cls.__name__}", (RedactedMessageProxy, cls), {})
    message.__class__ = redacted
