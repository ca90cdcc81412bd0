"""Frames between the WebSocket server and browsers: JSON text ``{"type", "id", "payload",
"timestamp"}``, and the close codes the server uses."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..models.errors import RPCErrorCode
from ..protocol import now_iso

#: Close code: missing, forged or expired token.
CLOSE_UNAUTHORIZED = 4401
#: Close code: the socket's send queue filled up (a reader that falls behind).
CLOSE_TOO_SLOW = 4008

_SEPARATORS = (",", ":")


def frame(kind: str, payload: Any, frame_id: str | None = None) -> str:
    """A message to a browser: ``{"type", "id", "payload", "timestamp"}`` as JSON text."""
    return json.dumps(
        {"type": kind, "id": frame_id or str(uuid.uuid4()), "payload": payload, "timestamp": now_iso()},
        separators=_SEPARATORS,
        ensure_ascii=False,
    )


def error_frame(
    code: RPCErrorCode, message: str, frame_id: str | None = None, retry_after: float | None = None
) -> str:
    """An ``error`` frame: ``{"code", "message"}`` plus ``retry_after`` when given."""
    payload: dict[str, Any] = {"code": code.value, "message": message}
    if retry_after is not None:
        payload["retry_after"] = retry_after
    return frame("error", payload, frame_id)


def parse(message: Any) -> dict[str, Any] | str:
    """A browser's frame as a JSON object, or why it is not one."""
    if not isinstance(message, str):
        return "send JSON text frames"
    try:
        obj = json.loads(message)
    except ValueError:
        return "frame is not JSON"
    if not isinstance(obj, dict):
        return "frame must be a JSON object"
    return obj
