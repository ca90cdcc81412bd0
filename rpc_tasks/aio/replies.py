"""One reply reader per event loop: every async call of that loop gets its reply through it.

A call registers a future under its correlation id (:meth:`ReplyReader.expect`) and gives the
reader's *inbox* as its reply address: a list under ``response_key_prefix``
(``<prefix>aio-<random hex>``), so workers and servers, which ``LPUSH`` + ``EXPIRE`` each reply
to the address a request names, need no change and every reply keeps its TTL. The reader
``BLPOP``s the inbox (with ``LPOP <inbox> 32`` pipelined behind, so a burst of replies costs one
round trip per 9), decodes each reply once and resolves the future of its correlation id.
Replies nobody waits for any more (the call timed out or was cancelled) are dropped and
counted (``counters["dropped"]``).

The reader task runs only while calls wait: it ends once the last future is resolved, and is
cancelled when the last waiting call gives up (the blocked ``BLPOP`` is abandoned with its
connection, and the reader moves to a fresh inbox, so that a reply the abandoned ``BLPOP`` may
have popped can only belong to a call that gave up). So no task outlives the calls.

Commands for the same Redis (enqueue scripts, ``XADD``) queued when the reader starts go out
in the same write as its ``BLPOP``: a lone call costs one round trip, as the sync ``.call()``.
If Redis goes away, every waiting call fails with :class:`RPCConnectionError`; the next call
reconnects.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from redis.exceptions import RedisError

from .. import protocol
from ..exceptions import RPCConnectionError, RPCException, RPCTimeoutError
from .connection import REPLY_TIMEOUT, CommandPipe, ConnectionSpec, read_reply, send_batch
from .pacing import Pacer

#: Server-side timeout of the reader's ``BLPOP`` (it loops while calls wait).
BLOCK_SECONDS = 5
#: Extra replies taken with each ``BLPOP`` (``LPOP <inbox> count``). Each reply wakes its
#: caller in the loop's next step: they are resolved in paced chunks (see
#: :mod:`rpc_tasks.aio.pacing`), so a long burst does not make one long step.
POP_BATCH = 8
_SLACK = 2.0


class ReplyReader:
    """The reply inbox of one event loop for one Redis server (see the module docstring).

    Parameters:
      spec: the Redis the replies are pushed to.
      prefix: ``response_key_prefix`` (workers only reply to addresses under it).
      max_bytes: the largest reply accepted (``max_payload_bytes``).
    """

    def __init__(self, spec: ConnectionSpec, *, prefix: str, max_bytes: int | None) -> None:
        self.spec = spec
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.inbox = self._new_inbox()
        #: Paces the wake-ups of the calls (replies here, enqueues in :attr:`pipe`).
        self.pacer = Pacer()
        #: Commands for this Redis; sent with the reader's ``BLPOP`` when it is about to write.
        self.pipe = CommandPipe(spec, piggyback=self._will_take, pacer=self.pacer)
        #: ``dropped``: replies nobody waited for; ``undecodable``: replies that were not JSON
        #: envelopes; ``lost_connection``: times Redis went away under waiting calls.
        self.counters: Counter[str] = Counter()
        self._waiters: dict[str, asyncio.Future[protocol.Response]] = {}
        #: Deadlines of the waiting calls, earliest first: ``(loop time, correlation id,
        #: method, timeout)``; entries of calls that stopped waiting are skipped when popped
        #: (and purged when they outnumber the waiting calls). One timer for the earliest.
        self._deadlines: list[tuple[float, str, str, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._taking = False
        self._blocking = False

    def _new_inbox(self) -> str:
        return protocol.reply_key(self.prefix, f"aio-{uuid4().hex}")

    def _will_take(self) -> bool:
        return self._task is not None and self._taking

    @property
    def waiting(self) -> int:
        """How many calls wait for a reply."""
        return len(self._waiters)

    def expect(
        self, correlation_id: str, expires: tuple[float, str, float] | None = None
    ) -> asyncio.Future[protocol.Response]:
        """Register a call; its future gets the decoded response (or ``RPCConnectionError``).
        The reply address to send is :attr:`inbox` (read it after this call).

        ``expires``: ``(loop time, method, timeout)``: at that loop time, if still waiting,
        the future gets ``RPCTimeoutError(method, timeout)`` (one timer for all the calls of
        the reader, not one per call)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[protocol.Response] = loop.create_future()
        self._waiters[correlation_id] = future
        if expires is not None:
            when, method, timeout = expires
            entry = (when, correlation_id, method, timeout)
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(self._waiters) + 64:  # mostly calls already answered
                deadlines[:] = [e for e in deadlines if e[1] in self._waiters]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, entry)
            if deadlines[0] is entry:  # the earliest now: (re)arm the timer for it
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(when, self._expire)
        if self._task is None:
            self._taking = True
            self._task = loop.create_task(self._run())
        return future

    def _expire(self) -> None:
        """The timer of the earliest deadline: fail the calls whose deadline passed."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines, waiters = self._deadlines, self._waiters
        while deadlines:
            when, correlation_id, method, timeout = deadlines[0]
            future = waiters.get(correlation_id)
            if future is not None and when > now:
                self._timer = loop.call_at(when, self._expire)
                return
            heapq.heappop(deadlines)
            if future is not None and not future.done():
                future.set_exception(RPCTimeoutError(method, timeout))

    def forget(self, correlation_id: str) -> None:
        """A call stopped waiting (answered, timed out or cancelled)."""
        self._waiters.pop(correlation_id, None)
        if not self._waiters:
            self._clear_deadlines()
        if not self._waiters and self._task is not None and self._blocking:
            # Nobody waits: abandon the blocked BLPOP (and its connection) and move to a new
            # inbox; a reply still on its way to the old one is dropped with its key's TTL.
            task, self._task, self._conn = self._task, None, None
            self._blocking = False
            self.inbox = self._new_inbox()
            task.cancel()

    async def _run(self) -> None:
        me = asyncio.current_task()
        if self._conn is None:
            self._conn = self.spec.connect()
        conn = self._conn
        try:
            while self._waiters:
                batch = self.pipe.take()
                self._taking = False
                self.pipe.kick()  # more than one write's worth waiting: the pipe sends the rest
                inbox = self.inbox
                tail = (("BLPOP", inbox, BLOCK_SECONDS), ("LPOP", inbox, POP_BATCH))
                await send_batch(conn, batch, tail, pacer=self.pacer)
                if not self._waiters:  # every caller gave up while the batch was read
                    await conn.disconnect(nowait=True)  # abandons the BLPOP
                    if self._conn is conn:
                        self._conn = None
                    self.inbox = self._new_inbox()
                    return
                self._blocking = True
                popped = await read_reply(conn, BLOCK_SECONDS + _SLACK)
                self._blocking = False
                # LPOP: runs as soon as the BLPOP returned, but the connection may go silent
                # in between (half-open): not waited for without a limit.
                rest = await read_reply(conn, REPLY_TIMEOUT)
                self._taking = True
                replies = [popped[1], *(rest or ())] if popped else list(rest or ())
                del popped, rest
                await self._deliver_paced(replies)
        except (RedisError, OSError) as exc:
            self.counters["lost_connection"] += 1
            waiters, self._waiters = self._waiters, {}
            self._clear_deadlines()
            for future in waiters.values():
                if not future.done():
                    future.set_exception(RPCConnectionError(f"lost Redis while waiting for a reply: {exc}"))
            if self._conn is conn:
                self._conn = None
            await conn.disconnect(nowait=True)
        finally:
            if self._task is me:
                self._task = None
                self._taking = self._blocking = False
            self.pipe.kick()  # commands queued for a write of ours that will not happen

    def _clear_deadlines(self) -> None:
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _deliver_paced(self, replies: list[Any]) -> None:
        """Deliver ``replies``, yielding to the loop whenever the pacer's chunk is full."""
        pacer = self.pacer
        for raw in replies:
            if pacer.full:
                await pacer.pause()
            self._deliver(raw)

    def _deliver(self, raw: Any) -> None:
        try:
            response = protocol.decode_response(raw, max_bytes=self.max_bytes)
        except RPCException:
            self.counters["undecodable"] += 1
            return
        future = self._waiters.pop(response.correlation_id, None)
        if future is None or future.done():
            self.counters["dropped"] += 1
            return
        self.pacer.wake()
        future.set_result(response)

    async def aclose(self) -> None:
        """Stop reading and close the connections; waiting calls fail with
        :class:`RPCConnectionError`."""
        waiters, self._waiters = self._waiters, {}
        self._clear_deadlines()
        for future in waiters.values():
            if not future.done():
                future.set_exception(RPCConnectionError("the reply reader was closed"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
        await self.pipe.aclose()


def stop_waiting_for(pending: asyncio.Future[Any]) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a call's reply future (from :meth:`ReplyReader.expect`): when that
    fails (its deadline, a lost connection) before ``pending`` (the call's command in a pipe)
    is confirmed, ``pending`` fails with the same error, so a frozen Redis cannot hold the
    call past its deadline. When the reply arrives first, the command evidently ran: ``pending``
    gets ``None`` (its own reply may be late, or lost on a connection gone silent)."""

    def stop(reply: asyncio.Future[Any]) -> None:
        if pending.done() or reply.cancelled():
            return
        error = reply.exception()
        if error is not None:
            pending.set_exception(error)
        else:
            pending.set_result(None)

    return stop
