"""The consumer of :class:`~rpc_tasks.redis.broker.BlockingRedisBroker`: blocks on the wake list
when idle, and never lets one message hurt the others.

Every message is fetched together with its Redis id (the broker's fetch returns both), so
whatever its bytes hold it can always be acked or dead-lettered. Each message of a fetched
batch is taken in on its own (:meth:`_BlockingConsumer._intake`):

* larger than the broker's ``max_message_bytes``: not decoded;
* not decodable (not JSON, a JSON array, a missing or wrong-typed field);
* options a worker would trip over (``throws`` from the wire, ``retries: "x"``, ...; see
  :func:`rpc_tasks.encoder.options_problem`);
* a ``queue_name`` other than the queue it was fetched from (a worker thread would look it up
  among its consumers and die, or ack it on the wrong queue);

each becomes a placeholder message for the reserved actor
:data:`~rpc_tasks.encoder.UNDECODABLE_ACTOR` carrying the reason, its Redis id and, when it
can be read, its reply address. Dramatiq's consumer thread dead-letters it at once (no worker
thread sees it) and :class:`~rpc_tasks.middleware.RPCReplies` logs the reason and answers the
caller with ``invalid_request``. A queue entry whose data is missing is acked away. The other
messages of the batch are unaffected.

While Redis is unreachable the consumer retries its fetch (and worker threads their acks) at
least every :data:`RETRY_SECONDS` instead of Dramatiq's 3 s consumer restart, so a worker
serves again within a quarter second of Redis coming back; messages a fetch moved to this
worker's ack set on a lost reply are requeued then. ``redis_message_id`` always comes from the fetch, so a
foreign producer's message without that option is processed and acked normally.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.errors import ConnectionClosed, ConnectionFailed

from ..encoder import RedactedMessageProxy, options_problem, placeholder_fields, salvage_reply_address
from . import internals

logger = logging.getLogger(__name__)

_RedisConsumer: type[Any] = internals.RedisConsumerBase

#: Longest pause between two tries while Redis is unreachable (fetches and acks).
RETRY_SECONDS = 0.25
#: How long an ack/nack is retried here before Dramatiq's own (slower) retry takes over.
FINISH_RETRY_SECONDS = 30.0


class _BlockingConsumer(_RedisConsumer):  # type: ignore[misc]
    #: Fetched (Redis id, raw message) pairs not yet handed out.
    message_cache: list[tuple[str, bytes | None]]

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        # timeout=0 turns Dramatiq's idle sleep into sleep(0); we block on the wake list instead.
        super().__init__(broker, queue_name, prefetch, 0)
        self.broker: Any = broker
        self.block_seconds = max(0.001, timeout / 1000.0)
        self.is_delay_queue = queue_name.endswith(".DQ")
        self._room = threading.Event()
        self._etas: dict[str, float] = {}
        self._lock = threading.Lock()
        # True once a fetch returned fewer messages than asked for: the queue was empty then,
        # and every later enqueue pushes a wake-up token, so the next fetch may block first.
        self._drained = False
        self._handed_off = False
        self._outage_since: float | None = None
        self._outage_sleep = 0.0
        broker.watch_queue(queue_name)

    def _earliest_eta(self) -> float | None:
        with self._lock:
            return min(self._etas.values(), default=None)

    def _block_for(self) -> float:
        if not self.is_delay_queue:
            return self.block_seconds
        earliest = self._earliest_eta()
        if earliest is None:
            return self.block_seconds
        return max(0.0, min(self.block_seconds, earliest - time.time()))

    def _fetch(self, room: int) -> list[tuple[str, bytes | None]] | None:
        """Fetch up to ``room`` (Redis id, message) pairs, first blocking on the wake list when
        the queue was drained; ``None`` when a wait for a held message's eta ran out (nothing
        fetched: the next round fetches without waiting)."""
        fetched: list[tuple[str, bytes | None]]
        if not self._drained:
            fetched = self.broker.fetch_with_ids(self.queue_name, room)
            return fetched
        if self._handed_off:
            # The last message was just put on the work queue and this thread is about to
            # block: let the worker thread woken for it take the GIL now rather than at this
            # thread's next I/O (halves the hand-over here, ~120 -> ~60 us).
            self._handed_off = False
            time.sleep(0)  # releases the GIL
        # A delay queue waits on its wake list too, never past the earliest eta it holds: a
        # delayed message enqueued meanwhile (with an earlier eta) wakes it at once.
        block = self._block_for()
        waited: list[tuple[str, bytes | None]] | None = self.broker.wait_and_fetch(
            self.queue_name, room, block, exact=block < self.block_seconds
        )
        return waited

    def __next__(self) -> Any:
        if not self.message_cache:
            room = self.prefetch - self.outstanding_message_count
            if room <= 0:
                # Saturated: wait until one of our messages is acked/nacked (or the timeout).
                self._room.clear()
                if self.outstanding_message_count >= self.prefetch:
                    self._room.wait(self._block_for())
                self._drained = False
                return None
            try:
                if self._outage_since is not None:
                    self._recover()
                fetched = self._fetch(room)
                if fetched is None:  # an eta is due: hand it over, then fetch without waiting
                    self._requeue_strays()  # what a fetch behind the cut wait moved (see below)
                    self._drained = False
                    return None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Handled here rather than by Dramatiq's consumer restart (3 s, dropping the
                # delay queue): retry every RETRY_SECONDS at most, so the consumer is back
                # within that of Redis coming back.
                self._outage(exc)
                return None
            self._drained = len(fetched) < room
            self.message_cache = fetched
        while self.message_cache:
            rid, data = self.message_cache.pop(0)
            message = self._intake(rid, data)
            if message is None:
                continue
            self.queued_message_ids.add(rid)
            self._handed_off = True
            if self.is_delay_queue:
                eta = message.options.get("eta")
                if isinstance(eta, (int, float)):
                    with self._lock:
                        self._etas[rid] = eta / 1000.0
            return MessageProxy(message) if self.broker.log_message_params else RedactedMessageProxy(message)
        return None

    def _requeue_strays(self) -> None:
        """Requeue what this worker's ack set holds beyond what this consumer holds: after an
        outage (a fetch whose reply was lost), and after a wait cut short on this side
        (``exact``, see ``wait_and_fetch``), which drops the connection with the ``BLPOP`` and
        the fetch pipelined behind it. When Redis had run that fetch already (a wake-up token
        arrived just before the cut), the messages it moved to the ack set were lost with the
        reply, and with this worker alive nothing would requeue them (seen as delayed messages
        held for good past their eta under rate-limit postponements)."""
        held = set(self.queued_message_ids) | {rid for rid, _ in self.message_cache}
        self.broker.requeue_strays(self.queue_name, held)

    def _outage(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self._outage_sleep = 0.0
            logger.warning(
                "Consumer of %r lost Redis (%s); retrying every %.2fs.", self.queue_name, exc, RETRY_SECONDS
            )
        # A fetch whose reply was lost may have moved messages to this worker's ack set.
        self._outage_sleep = min(RETRY_SECONDS, self._outage_sleep * 2 or 0.01)
        time.sleep(self._outage_sleep)

    def _recover(self) -> None:
        """Redis answers again: requeue what a lost fetch reply left in our ack set."""
        self._requeue_strays()
        assert self._outage_since is not None
        logger.warning(
            "Consumer of %r has Redis back after %.2fs.",
            self.queue_name,
            time.monotonic() - self._outage_since,
        )
        self._outage_since = None
        self._drained = False

    def _intake(self, rid: str, data: bytes | None) -> Message[Any] | None:
        """The message to hand to Dramatiq for one fetched entry: the decoded message, or a
        placeholder to dead-letter (see the module docstring); ``None`` for an entry without
        data (acked here)."""
        if data is None:
            logger.warning(
                "Queue %r held message id %s without data; dropped from this worker's ack set.",
                self.queue_name,
                rid,
            )
            try:
                self.broker.do_ack(self.queue_name, rid)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ConnectionClosed(exc) from None
            return None
        limit = self.broker.max_message_bytes
        if limit is not None and len(data) > limit:
            return self._placeholder(
                rid, data, f"message is {len(data)} bytes, over the limit of {limit} bytes"
            )
        try:
            message: Message[Any] = Message.decode(data)
        except Exception as exc:  # DecodeError (not JSON), or any other encoder's failure
            cause = exc.__cause__ or exc
            return self._placeholder(rid, data, f"not a valid message ({type(cause).__name__})")
        options = message.options
        problem = options_problem(options)
        if message.queue_name != self.queue_name:
            problem = f"its queue_name is not {self.queue_name!r}, the queue it was fetched from"
        if problem is not None:
            return self._placeholder(rid, data, problem, message)
        options["redis_message_id"] = rid
        return message

    def _placeholder(
        self, rid: str, data: bytes, reason: str, decoded: Message[Any] | None = None
    ) -> Message[Any]:
        if decoded is not None:
            message_id: str | None = decoded.message_id
            reply_to = decoded.options.get("rpc_reply_to")
        else:
            message_id, reply_to = salvage_reply_address(data)
        fields = placeholder_fields(
            reason, queue_name=self.queue_name, message_id=message_id, reply_to=reply_to, redis_message_id=rid
        )
        fields["args"] = ()
        return Message(**fields)

    def close(self) -> None:
        """Put back on the queue what this consumer fetched and nobody will finish any more.

        Dramatiq closes a consumer when its consumer thread restarts it (after a connection
        error, or any error raised in that thread, e.g. by the enqueue that moves a delayed
        message to its queue) and at shutdown. Until now, two kinds of message then stayed in
        this worker's ack set, and with the worker alive (its heartbeat fresh) nothing requeued
        them until it restarted:
        * messages fetched but not handed out yet (the cache);
        * for a delay queue, the delayed messages handed out: Dramatiq keeps them only in its
          consumer thread's memory, which it drops on a connection error without requeueing,
          or requeues without the one whose enqueue failed.
        Requeueing is idempotent (Dramatiq's script skips an id no longer in the ack set). A
        delayed message whose move to its queue succeeded but whose ack did not may run twice,
        as after any lost ack."""
        held = [rid for rid, _ in self.message_cache]
        self.message_cache = []
        if self.is_delay_queue:
            with self._lock:
                held += list(self._etas)
                self._etas.clear()
        if held:
            try:
                self.broker.do_requeue(self.queue_name, *held)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Left in the ack set: requeued when this worker's heartbeat stops.
                logger.warning("Could not requeue %d message(s) of %r: %s", len(held), self.queue_name, exc)
            else:
                for rid in held:
                    self.queued_message_ids.discard(rid)
        super().close()

    def _done(self, rid: str) -> None:
        if self.is_delay_queue:
            with self._lock:
                self._etas.pop(rid, None)
        self._room.set()

    def ack(self, message: Any) -> None:
        self._finish("ack", message)

    def nack(self, message: Any) -> None:
        self._finish("nack", message)

    def requeue(self, messages: Any) -> None:
        ids = [rid for m in messages if isinstance(rid := m.options.get("redis_message_id"), str)]
        if ids:
            self.broker.do_requeue(self.queue_name, *ids)

    def _finish(self, command: str, message: Any) -> None:
        redis_message_id = message.options.get("redis_message_id")
        try:
            if not isinstance(redis_message_id, str):  # cannot happen: the fetch sets it
                logger.error("Message %s has no Redis id; cannot %s it.", message.message_id, command)
                return
            # The current queue may differ from message.queue_name (delayed messages): finish
            # on the consumer's queue, as Dramatiq does. During an outage, retried here every
            # RETRY_SECONDS at most (Dramatiq's own retry waits 5 s between tries); an ack is
            # safe to send again (a second one changes nothing and pushes no second reply).
            give_up = time.monotonic() + FINISH_RETRY_SECONDS
            pause = 0.01
            while True:
                try:
                    self.broker.finish(command, self.queue_name, redis_message_id)
                    break
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() + pause > give_up:
                        raise
                    time.sleep(pause)
                    pause = min(RETRY_SECONDS, pause * 2)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Dramatiq retries post-processing on connection errors: keep the deferred reply.
            raise ConnectionClosed(exc) from None
        except (ConnectionClosed, ConnectionFailed):
            raise
        except BaseException:
            self.broker.drop_deferred_reply(redis_message_id)
            raise
        finally:
            self.queued_message_ids.discard(redis_message_id)
            self._done(redis_message_id if isinstance(redis_message_id, str) else "")
