"""A Dramatiq JSON encoder that never turns a structurally bad message into a crash loop.

Dramatiq's ``Message.decode`` raises ``DecodeError`` when a message is valid JSON but not a
valid message (missing fields, ``args`` not a list, ...). On the Redis broker that exception
escapes the consumer, which restarts, while the message stays in the worker's ack set and is
redelivered later to fail again; a ``.call()`` caller waits until its timeout.

:class:`RPCJSONEncoder` decodes such a message into a placeholder addressed to the reserved
actor name :data:`UNDECODABLE_ACTOR`, keeping its id, queue and options (so the broker can
still nack it and the caller's reply address is known). ``RPCReplies`` fails it at once: it is
dead-lettered with the reason, and a ``.call()`` caller gets an ``invalid_request`` reply.
Bytes that are not JSON at all still raise ``DecodeError`` as in Dramatiq (there is no reply
address to salvage).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

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

    def decode(self, data: bytes) -> dict[str, Any]:
        obj = super().decode(data)
        problem = _problem(obj)
        if problem is None:
            return dict(obj)
        src: dict[str, Any] = obj if isinstance(obj, dict) else {}
        raw_options = src.get("options")
        options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        queue = src.get("queue_name") if isinstance(src.get("queue_name"), str) else "default"
        message_id = src.get("message_id") if isinstance(src.get("message_id"), str) else str(uuid.uuid4())
        return {
            "queue_name": queue,
            "actor_name": UNDECODABLE_ACTOR,
            "args": [],
            "kwargs": {},
            "options": {**options, OPTION_DECODE_ERROR: problem},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        }
