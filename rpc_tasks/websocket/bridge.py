"""The bridge back to Django: a browser's ``request`` frame becomes a request on
``bridge_stream`` (served by an :class:`~rpc_tasks.streams.server.RPCServer` in Django, e.g.
``manage.py rpc_serve --bridge``), and its reply a ``response`` or ``error`` frame."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from .. import protocol
from ..config import WebSocketRPCConfig
from ..exceptions import RPCException
from ..models.errors import RPCError, RPCErrorCode
from . import frames
from .connection import Connection
from .models import BridgeParams
from .store import AsyncWSStore

#: Bridge requests one socket may have in flight.
MAX_IN_FLIGHT = 8


def default_max_waits(config: WebSocketRPCConfig) -> int:
    """Bridge requests waiting for Django at once, server-wide: half the Redis pool
    (``redis_max_connections``), so presence, fan-out and the RPC methods always find a
    connection."""
    return max(1, config.redis_max_connections // 2)


class Bridge:
    """Forwards browser requests to Django and their replies back (``timeout`` seconds each,
    from the frame's arrival). Each request holds a Redis connection while it waits for its
    reply; at most ``max_waits`` do at once (default :func:`default_max_waits`), the others
    queue (their wait counts against their timeout)."""

    def __init__(
        self, config: WebSocketRPCConfig, store: AsyncWSStore, timeout: float, max_waits: int | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.timeout = timeout
        self.max_waits = max_waits or default_max_waits(config)
        self._waits = asyncio.Semaphore(self.max_waits)

    async def handle(self, conn: Connection, frame_id: str | None, obj: dict[str, Any]) -> None:
        """Serve one ``{"type": "request", "method", "params"}`` frame (run as a task; the
        caller counted it in ``conn.bridge_in_flight``)."""
        try:
            method, data = obj.get("method"), obj.get("params", {})
            if not isinstance(method, str) or not protocol.METHOD_NAME_RE.fullmatch(method):
                conn.error(frame_id, RPCErrorCode.INVALID_REQUEST, "method must match ^[a-zA-Z0-9_.]+$")
                return
            if not isinstance(data, dict):
                conn.error(frame_id, RPCErrorCode.INVALID_REQUEST, "params must be an object")
                return
            deadline = time.monotonic() + self.timeout
            try:
                await asyncio.wait_for(self._waits.acquire(), self.timeout)
            except asyncio.TimeoutError:
                conn.error(frame_id, RPCErrorCode.TIMEOUT, "the bridge to Django is busy; try again")
                return
            try:
                raw = await self._forward(conn, frame_id, method, data, deadline)
            finally:
                self._waits.release()
            if raw is None:
                return
            response = protocol.decode_response(raw, max_bytes=self.config.max_payload_bytes)
            if response.success:
                conn.offer(frames.frame("response", {"method": method, "result": response.result}, frame_id))
            else:
                err = response.error or RPCError(message="failed")
                conn.error(frame_id, err.code, err.message, err.retry_after)
        except RPCException as exc:
            conn.error(frame_id, RPCErrorCode.SERVICE_UNAVAILABLE, f"bridge unavailable: {exc}")
        finally:
            conn.bridge_in_flight -= 1

    async def _forward(
        self, conn: Connection, frame_id: str | None, method: str, data: dict[str, Any], deadline: float
    ) -> bytes | None:
        """Enqueue the request with the time left and wait for its reply; ``None`` when an
        error frame was sent instead."""
        left = deadline - time.monotonic()
        if left <= 0:
            conn.error(frame_id, RPCErrorCode.TIMEOUT, "the bridge to Django is busy; try again")
            return None
        correlation_id = str(uuid.uuid4())
        reply_to = protocol.reply_key(self.config.response_key_prefix, correlation_id)
        params = BridgeParams(user_id=conn.user_id, connection_id=conn.id, data=data)
        try:
            payload = protocol.encode_request(
                method,
                params,
                reply_to=reply_to,
                timeout=protocol.wire_timeout(left),
                correlation_id=correlation_id,
                extensions={protocol.ERROR_DETAILS_EXTENSION},
                max_bytes=self.config.max_payload_bytes,
            )
        except (ValueError, RPCException) as exc:
            conn.error(frame_id, RPCErrorCode.INVALID_REQUEST, str(exc))
            return None
        await self.store.add_request(self.config.bridge_stream, payload, self.config.stream_maxlen)
        raw = await self.store.wait_reply(reply_to, deadline - time.monotonic())
        if raw is None:
            conn.error(frame_id, RPCErrorCode.TIMEOUT, "Django did not answer in time")
        return raw
