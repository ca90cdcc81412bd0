"""One browser socket: its bounded send queue and writer, its message-rate bucket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..models.connections import ConnectionInfo
from ..models.errors import RPCErrorCode
from . import frames

logger = logging.getLogger("rpc_tasks.websocket.server")


class Connection:
    """A socket of an authenticated user.

    Frames go through a queue of ``send_queue`` frames that one writer task drains; a reader
    so slow that the queue fills up is disconnected (close code
    :data:`~rpc_tasks.websocket.frames.CLOSE_TOO_SLOW`) instead of buffering without end.
    Incoming messages spend tokens of a bucket that refills at ``rate`` per second up to
    ``burst``. ``translate`` rewrites every frame offered (a socket of another dialect).
    """

    def __init__(
        self,
        ws: Any,
        info: ConnectionInfo,
        *,
        send_queue: int,
        burst: int,
        counters: Counter[str],
        translate: Callable[[str], str] | None = None,
    ) -> None:
        self.id = info.connection_id
        self.user_id = info.user_id
        self.ws = ws
        self.info = info
        self.queue: asyncio.Queue[tuple[str, asyncio.Future[bool] | None]] = asyncio.Queue(maxsize=send_queue)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.bridge_in_flight = 0
        self.closing = False
        self._counters = counters
        self._close_task: asyncio.Task[None] | None = None
        #: Rewrites native frames for a socket that speaks another dialect (django-ipc's).
        self.translate = translate

    async def write_loop(self) -> None:
        """Send queued frames until the socket fails (run as one task per connection)."""
        while True:
            frame, done = await self.queue.get()
            try:
                await self.ws.send(frame)
                ok = True
            except Exception:
                ok = False
            if done is not None and not done.done():
                done.set_result(ok)
            if not ok:
                return

    def offer(self, frame: str, wait: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``frame``; with ``wait``, a future that says whether the socket took it. A
        full queue disconnects the (too slow) reader."""
        if self.closing:
            return None
        if self.translate is not None:
            frame = self.translate(frame)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] | None = loop.create_future() if wait else None
        try:
            self.queue.put_nowait((frame, done))
        except asyncio.QueueFull:
            self.closing = True
            self._counters["slow_disconnected"] += 1
            logger.warning("connection %s of user %s reads too slowly; disconnecting", self.id, self.user_id)
            self._close_task = loop.create_task(self.ws.close(frames.CLOSE_TOO_SLOW, "send queue full"))
            return None
        return done

    def error(
        self, frame_id: str | None, code: RPCErrorCode, message: str, retry_after: float | None = None
    ) -> None:
        """Queue an ``error`` frame."""
        self.offer(frames.error_frame(code, message, frame_id, retry_after))

    def take_token(self, rate: float, burst: int) -> float | None:
        """Spend one token for an incoming message: ``None`` if allowed, else the seconds until
        one is available."""
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens < 1.0:
            return round((1.0 - self.tokens) / rate, 3)
        self.tokens -= 1.0
        return None
