"""django-ipc's browser dialect, spoken to sockets that log in the django-ipc way.

A socket that brings no token with the upgrade (no ``?token=``, no ``Authorization`` header)
has :data:`AUTH_TIMEOUT` seconds to send the text frame ``Bearer <JWT>``, as django-ipc's
clients do. It then gets django-ipc's frames for the rest of its life:

* after the login ``{"type": "auth", "status": "ok", "server_version": "..."}``; a failed
  login is closed with code **1008** ``Authentication failed`` (``Authentication timeout``
  when nothing came), without an error frame;
* pushes ``{"type": "notification", "data": {"notification_type", "title", "message",
  "data", "priority"}}`` and ``{"type": "broadcast", "data": "<message>"}``;
* requests ``{"type": "rpc", "method", "params", "correlation_id"}`` answered with
  ``{"type": "response", "correlation_id", "result", "error": null}`` or ``{"type": "error",
  "correlation_id", "result": null, "error": {"code", "message", "details", "retryable",
  "retry_after"}}`` (codes from django-ipc's enum, text at most 500 characters);
* methods served here: ``system.ping``, ``join_room`` / ``leave_room`` (``{"room",
  "notify_room"}``, for the socket's user); any other method goes over the bridge to Django
  when it is enabled (so browsers never reach ``send_notification`` or ``broadcast``), else
  ``method_not_found``. ``{"type": "ping"}`` gets ``{"type": "pong"}``.

Frames that shared code builds in the native form (notifications, broadcasts, bridge answers,
errors) are rewritten for these sockets by :func:`to_ipc`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field, ValidationError

from .. import compat, protocol
from ..models.errors import RPCError, RPCErrorCode
from ..streams.builtins import SystemPingParams, system_ping
from .auth import TokenClaims, TokenError
from .bridge import MAX_IN_FLIGHT, Bridge
from .connection import Connection
from .models import ROOM_PATTERN
from .store import AsyncWSStore

#: Seconds a socket without a token has to send ``Bearer <JWT>``.
AUTH_TIMEOUT = 10.0
#: Close code of a failed django-ipc login (policy violation).
CLOSE_AUTH_FAILED = 1008

_BEARER = re.compile(r"\s*bearer\s+(\S+)\s*", re.IGNORECASE)


class RoomParams(BaseModel):
    """django-ipc's ``join_room`` / ``leave_room`` params (the user is the socket's)."""

    room: str = Field(pattern=ROOM_PATTERN)
    notify_room: bool = False


def brings_token(request: Any) -> bool:
    """The upgrade request carries credentials (``?token=`` or an ``Authorization`` header):
    a native login. Without them the socket may log in the django-ipc way."""
    query = parse_qs(urlsplit(request.path).query, keep_blank_values=True)
    return "token" in query or bool(request.headers.get("Authorization"))


def bearer_token(message: Any) -> str | None:
    """The token of a ``Bearer <token>`` text frame (scheme in any case), else ``None``."""
    if not isinstance(message, str) or len(message) > 8192:
        return None
    match = _BEARER.fullmatch(message)
    return match.group(1) if match else None


async def first_frame_login(
    ws: Any, verify: Callable[[str | None], TokenClaims], timeout: float = AUTH_TIMEOUT
) -> TokenClaims | None:
    """Wait for django-ipc's ``Bearer <JWT>`` frame and check it. ``None`` (after closing the
    socket with 1008, or when the peer went away) if the login failed."""
    try:
        message = await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError:
        await ws.close(CLOSE_AUTH_FAILED, "Authentication timeout")
        return None
    except Exception:  # ConnectionClosed: nothing to answer
        return None
    try:
        return verify(bearer_token(message))
    except TokenError:
        await ws.close(CLOSE_AUTH_FAILED, "Authentication failed")
        return None


def auth_frame(server_version: str) -> str:
    """The answer to a successful login."""
    return json.dumps({"type": "auth", "status": "ok", "server_version": server_version})


def response_frame(correlation_id: Any, result: Any) -> str:
    """A successful answer to an ``rpc`` frame."""
    return _dumps({"type": "response", "correlation_id": correlation_id, "result": result, "error": None})


def error_frame(
    correlation_id: Any,
    code: RPCErrorCode | str,
    message: str,
    *,
    retry_after: float | None = None,
    validation_errors: list[dict[str, Any]] | None = None,
) -> str:
    """A failed answer: django-ipc's error object (its codes, at most 500 characters)."""
    error = RPCError.from_wire(code.value if isinstance(code, RPCErrorCode) else code, message)
    body: dict[str, Any] = {
        "code": compat.legacy_error_code(error),
        "message": compat.legacy_error_text(message),
        "details": None,
        "retryable": error.retryable,
        "retry_after": None if retry_after is None else math.ceil(retry_after),  # whole seconds there
    }
    if validation_errors is not None:
        body["validation_errors"] = validation_errors
    return _dumps({"type": "error", "correlation_id": correlation_id, "result": None, "error": body})


@functools.lru_cache(maxsize=64)  # one broadcast frame goes to many sockets: rewrite it once
def to_ipc(native: str) -> str:
    """A native frame (``{"type", "id", "payload", "timestamp"}``) in django-ipc's form."""
    try:
        obj = json.loads(native)
    except ValueError:
        return native
    if not isinstance(obj, dict) or "payload" not in obj:
        return native
    kind, frame_id, payload = obj.get("type"), obj.get("id"), obj.get("payload") or {}
    if kind == "notification":
        keys = ("notification_type", "title", "message", "data", "priority")
        return json.dumps({"type": "notification", "data": {k: payload.get(k) for k in keys}})
    if kind == "broadcast":
        text = payload.get("message") or payload.get("title") or payload.get("event_type")
        return json.dumps({"type": "broadcast", "data": text})
    if kind == "response":
        return response_frame(frame_id, payload.get("result"))
    if kind == "error":
        retry_after = payload.get("retry_after")
        return error_frame(
            frame_id,
            str(payload.get("code") or "internal_error"),
            str(payload.get("message") or ""),
            retry_after=retry_after if isinstance(retry_after, (int, float)) else None,
        )
    if kind == "pong":
        return _dumps({"type": "pong", "correlation_id": frame_id})
    return native


class IpcDialect:
    """Serves the ``rpc`` frames of django-ipc sockets (see the module docstring).

    Args:
      store: rooms and presence in Redis.
      bridge: the bridge to Django (``None`` when disabled).
    """

    def __init__(self, store: AsyncWSStore, bridge: Bridge | None) -> None:
        self.store = store
        self.bridge = bridge
        self.methods: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[Any]]] = {
            "system.ping": self._system_ping,
            "join_room": self._join_room,
            "leave_room": self._leave_room,
        }
        self._tasks: set[asyncio.Task[None]] = set()

    def on_message(self, conn: Connection, message: Any) -> None:
        """Handle one frame of a django-ipc socket."""
        if not isinstance(message, str):
            conn.offer(error_frame(None, "invalid_params", "send JSON text frames"))
            return
        try:
            obj = json.loads(message)
        except ValueError as exc:
            conn.offer(error_frame(None, "invalid_params", f"Invalid JSON: {exc}"))
            return
        if not isinstance(obj, dict):
            conn.offer(error_frame(None, "invalid_params", "a frame must be a JSON object"))
            return
        cid = obj.get("correlation_id") if isinstance(obj.get("correlation_id"), str) else None
        kind = obj.get("type")
        if kind == "ping":
            conn.offer(_dumps({"type": "pong", "correlation_id": cid}))
        elif kind == "rpc":
            self._rpc(conn, cid, obj.get("method"), obj.get("params"))
        else:
            conn.offer(error_frame(cid, "method_not_found", f"Unknown message type: {kind}"))

    def _rpc(self, conn: Connection, cid: str | None, method: Any, params: Any) -> None:
        if not isinstance(method, str) or not protocol.METHOD_NAME_RE.fullmatch(method):
            conn.offer(error_frame(cid, "invalid_params", "RPC message missing 'method' field"))
            return
        params = {} if params is None else params
        if not isinstance(params, dict):
            conn.offer(error_frame(cid, "invalid_params", "params must be an object"))
            return
        local = self.methods.get(method)
        if local is not None:
            self._spawn(self._run(conn, cid, local, params))
        elif self.bridge is None:
            conn.offer(error_frame(cid, "method_not_found", f"Method not found: {method}"))
        elif conn.bridge_in_flight >= MAX_IN_FLIGHT:
            busy = "too many requests in flight"
            conn.offer(error_frame(cid, "rate_limit_exceeded", busy, retry_after=1.0))
        else:
            conn.bridge_in_flight += 1
            self._spawn(self.bridge.handle(conn, cid, {"method": method, "params": params}))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        conn: Connection,
        cid: str | None,
        method: Callable[[Connection, dict[str, Any]], Awaitable[Any]],
        params: dict[str, Any],
    ) -> None:
        try:
            result = await method(conn, params)
        except ValidationError as exc:
            problems = [
                {"field": ".".join(str(p) for p in e.get("loc", ())), "error": e.get("msg", "")}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            conn.offer(error_frame(cid, "validation_error", "Validation failed", validation_errors=problems))
            return
        except Exception as exc:  # Redis failures and the like
            conn.offer(error_frame(cid, "internal_error", f"Handler error: {type(exc).__name__}"))
            return
        conn.offer(response_frame(cid, result))

    async def _system_ping(self, conn: Connection, params: dict[str, Any]) -> Any:
        ping = SystemPingParams.model_validate(params)
        if ping.delay_ms:
            await asyncio.sleep(ping.delay_ms / 1000)
        return system_ping(ping.model_copy(update={"delay_ms": 0})).model_dump() | {"delay_ms": ping.delay_ms}

    async def _join_room(self, conn: Connection, params: dict[str, Any]) -> Any:
        room = RoomParams.model_validate(params).room
        await self.store.room_join(room, conn.user_id)
        return {"room": room, "joined": True}

    async def _leave_room(self, conn: Connection, params: dict[str, Any]) -> Any:
        room = RoomParams.model_validate(params).room
        await self.store.room_leave(room, conn.user_id)
        return {"room": room, "left": True}


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
