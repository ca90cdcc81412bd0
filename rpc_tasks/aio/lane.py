"""The fast lane: a lone async call costs what a sync ``.call()`` costs.

When nothing else waits on the loop, an async call does not need the reply reader: it sends
its request (the enqueue script, an ``XADD``), ``BLPOP`` on its own reply key and ``DEL`` of
that key in one write on the lane's connection, and reads the replies in its own task (the
async twin of :meth:`ReplyChannel.wait(first=...) <rpc_tasks.redis.replies.ReplyChannel.wait>`):
one round trip, no reader task to start, no extra steps of the loop. One call at a time uses
the lane (so it adds one connection per loop); calls that find it busy, or find other calls
waiting, go through the reply reader.

The deadline is enforced on the client side: when it passes, the connection is dropped, which
also abandons the ``BLPOP`` on the server (the next call reconnects); so is a cancelled call's.
A late reply stays on its own key until the key's TTL ends, as with the sync ``.call()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis

from ..redis.connection import MIN_BLOCK_SECONDS, SERVER_SLACK_SECONDS, pack
from .connection import REPLY_TIMEOUT, ConnectionSpec, read_reply


class FirstCommandFailed(Exception):
    """The request sent ahead of the ``BLPOP`` failed (``__cause__``: the ``redis`` error);
    nothing was waited for."""


class FastLane:
    """One waiting call at a time on a connection of its own (see the module docstring)."""

    def __init__(self, spec: ConnectionSpec) -> None:
        self.spec = spec
        self.busy = False
        self._conn: Any = None

    async def request(
        self,
        first: tuple[Any, ...] | None,
        key: str,
        timeout: float,
        on_first: Callable[[Any], None] | None = None,
    ) -> bytes | None:
        """Send ``first`` (if any), ``BLPOP key`` and ``DEL key`` in one write; the reply, or
        ``None`` when ``timeout`` seconds pass first. ``on_first`` gets ``first``'s reply as
        soon as it is read. Raises :class:`FirstCommandFailed` when ``first`` failed, a
        ``redis`` error when the connection broke while waiting."""
        self.busy = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout)
        if self._conn is None:
            self._conn = self.spec.connect()
        conn = self._conn
        wait_for = max(float(timeout), MIN_BLOCK_SECONDS)
        commands: list[tuple[Any, ...]] = [
            ("BLPOP", key, round(wait_for + SERVER_SLACK_SECONDS, 3)),
            ("DEL", key),
        ]
        if first is not None:
            commands.insert(0, first)
        try:
            try:
                await conn.send_packed_command(pack(conn, commands), check_health=False)
                if first is not None:
                    # Within the deadline: a frozen Redis must not hold the call (read_reply
                    # drops the connection, which abandons the BLPOP behind it).
                    left = max(deadline - loop.time(), MIN_BLOCK_SECONDS)
                    try:
                        first_reply = await read_reply(conn, min(left, REPLY_TIMEOUT))
                    except redis.TimeoutError:
                        if left >= REPLY_TIMEOUT:
                            raise
                        return None  # the deadline passed before Redis answered the request
            except (redis.RedisError, OSError) as exc:
                await conn.disconnect(nowait=True)  # abandons the BLPOP queued behind it
                raise FirstCommandFailed(str(exc)) from exc
            if first is not None and on_first is not None:
                on_first(first_reply)
            # An explicit read timeout shorter than the BLPOP's own: None means our deadline.
            popped = await conn.read_response(timeout=max(deadline - loop.time(), MIN_BLOCK_SECONDS))
            if popped is None:
                await conn.disconnect(nowait=True)
                return None
            try:  # the DEL, run as soon as the BLPOP returned: unless the connection went silent
                await read_reply(conn, max(deadline - loop.time(), MIN_BLOCK_SECONDS))
            except redis.TimeoutError:
                pass  # read_reply dropped the connection; the reply popped is this call's

        except BaseException:
            # Lost connection, or a cancelled caller: never reuse a connection with replies
            # still in flight (redis-py has usually dropped it already).
            await conn.disconnect(nowait=True)
            raise
        finally:
            self.busy = False
        value = popped[1] if popped else None
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    async def aclose(self) -> None:
        """Close the connection (the next call opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
