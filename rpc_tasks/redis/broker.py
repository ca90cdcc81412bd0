"""``BlockingRedisBroker``: Dramatiq's ``RedisBroker`` whose idle consumers block instead of
polling.

Dramatiq's Redis consumer fetches with a Lua script, which cannot block, so an idle consumer
sleeps with a backoff of up to ``worker_timeout`` (1 s): a message sent to an idle worker waits
up to a second, and shorter timeouts burn CPU. Here every enqueue also pushes a wake-up token
on ``<namespace>:<queue>.wake`` (in the same round trip). A consumer whose last fetch came back
short (the queue was empty) sends ``BLPOP`` on that list (up to ``worker_timeout``) and
Dramatiq's fetch script in one pipeline: Redis runs the fetch the moment the ``BLPOP`` returns,
so waking up and fetching cost one round trip. Everything else, the queues, acks, requeue of
dead workers' messages, delayed messages, dead letters, is Dramatiq's own Lua scripts,
unchanged:

* tokens are only hints: a consumer blocks only after a fetch came back short, and a message
  that arrives without a token (requeued by Dramatiq's maintenance, or sent by a plain
  ``RedisBroker``) is fetched at the latest when the ``BLPOP`` times out; an extra token costs
  one empty fetch; the wake list is capped (``LTRIM``) so it never grows while consumers are
  busy;
* a consumer that holds its full prefetch waits for one of its messages to be acked instead;
* the delay-queue consumer never waits past the earliest ``eta`` it holds, and a delayed
  message enqueued meanwhile wakes it, so delayed messages (retries, postponements) are handed
  over on time.

Reliability (see :mod:`rpc_tasks.redis.consumer` for what happens to unprocessable messages):

* every fetch returns each message's Redis id with its data, so any message can be acked or
  dead-lettered whatever its bytes hold; ``max_message_bytes`` caps what is decoded;
* a process with consumers runs Dramatiq's maintenance (through Dramatiq's own dispatch script)
  for each of its queues every ``heartbeat_timeout / 4``: the messages of a worker that died
  are requeued within ``1.25 x heartbeat_timeout`` even when nothing else happens (Dramatiq
  itself only runs it by chance, ``maintenance_chance`` per million commands), and the
  process's heartbeat stays fresh while all its threads are busy;
* ``heartbeat_timeout`` defaults to :data:`DEFAULT_HEARTBEAT_TIMEOUT_MS` (10 s, Dramatiq's is
  60 s): a ``.call()`` whose worker was SIGKILLed runs again on another worker within ~13 s.

For ``.call()`` (when the reply channel is on the broker's Redis server and database):

* :meth:`BlockingRedisBroker.enqueue_and_wait` sends the enqueue script and the reply's ``BLPOP``
  in one write, so the caller pays one round trip;
* :meth:`BlockingRedisBroker.defer_reply` holds a success reply until the message's ack, and the
  ack script pushes it (``LPUSH`` + ``EXPIRE``) atomically with the ack: one round trip for the
  worker thread instead of two.

The consumer's fetch and the worker threads' acks run on a connection each thread keeps (see
:func:`rpc_tasks.redis.connection.pipelined`).

Idle cost per queue: one ``BLPOP`` + fetch pipeline per ``worker_timeout`` for the queue and for its
delay queue (about 4 Redis commands per second with the default 1 s).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from redis.exceptions import NoScriptError

from .. import metrics
from . import internals, topology
from .connection import pipelined, same_redis, thread_connection, wait_readable
from .consumer import _BlockingConsumer
from .dispatch import enqueue_replicated, fetched_pairs, rpc_dispatch_source
from .maintenance import Maintenance
from .replies import ReplyChannel

logger = logging.getLogger(__name__)

#: Newest Dramatiq release this module was tested with (``pyproject.toml`` caps it the same).
TESTED_DRAMATIQ = "2.2"


#: Why ``BlockingRedisBroker`` cannot run on the installed Dramatiq (``None``: it can); see
#: :mod:`rpc_tasks.redis.internals`.
INTERNALS_PROBLEM = internals.INTERNALS_PROBLEM


_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "rpc-tasks: Dramatiq %s is not the %s this version was tested with (%s); using "
            "Dramatiq's plain RedisBroker (correct, but idle workers poll and .call() is slower)",
            dramatiq.__version__,
            TESTED_DRAMATIQ,
            INTERNALS_PROBLEM,
        )


def redis_broker(url: str, **options: Any) -> RedisBroker:
    """The broker :func:`rpc_tasks.setup_broker` builds for a Redis URL: a
    :class:`BlockingRedisBroker`, or Dramatiq's plain ``RedisBroker`` (with one warning) when the
    installed Dramatiq's internals no longer have the shape it was written against."""
    if INTERNALS_PROBLEM is None:
        return BlockingRedisBroker(url=url, **options)
    _warn_fallback()
    options.pop("max_message_bytes", None)
    if topology.is_topology_url(url):  # Sentinel: the shared master client (issue 18)
        kwargs, _ = topology.broker_options({"url": url, **options})
        return RedisBroker(**kwargs)
    return RedisBroker(url=url, **options)


def redis_broker_path() -> str:
    """Dotted path of that broker class, for django-dramatiq's ``DRAMATIQ_BROKER["BROKER"]``."""
    if INTERNALS_PROBLEM is None:
        return f"{BlockingRedisBroker.__module__}.{BlockingRedisBroker.__qualname__}"
    _warn_fallback()
    return "dramatiq.brokers.redis.RedisBroker"


#: ``BlockingRedisBroker``'s default ``heartbeat_timeout`` (ms): a worker silent that long is
#: dead and its unacked messages are requeued (Dramatiq's default is 60 s).
DEFAULT_HEARTBEAT_TIMEOUT_MS = 10_000
#: Room for the envelope (options, ids) on top of ``max_payload_bytes`` in a message's size cap.
ENVELOPE_ROOM_BYTES = 65_536
#: Default ``max_message_bytes``: the default ``max_payload_bytes`` (1 MiB) plus the envelope.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576 + ENVELOPE_ROOM_BYTES
#: Dispatch-script command that matches none of its branches: only the heartbeat and (asked
#: for) the maintenance run.
MAINTENANCE_COMMAND = "rpc_tasks_maintenance"


def wake_key(namespace: str, queue_name: str) -> str:
    """The wake-up list of ``queue_name`` (a delay queue ``<queue>.DQ`` has its own,
    ``<queue>.DQ.wake``, pushed when a delayed message is enqueued)."""
    return f"{namespace}:{queue_name}.wake"


def _reply_push_failed(
    redis_message_id: str, queue_name: str, reply: tuple[str, bytes, int, str], outcome: bytes
) -> None:
    """A deferred reply was not pushed (the ack went through): logged, and counted like a reply
    :class:`~rpc_tasks.middleware.RPCReplies` failed to push itself (``reply_push_failed``)."""
    metrics.emit("reply_push_failed", actor=reply[3], queue=queue_name)
    logger.error(
        "Message %s was acked but its reply could not be pushed to %r (%s); no TTL was set.",
        redis_message_id,
        reply[0],
        outcome.decode(errors="replace").partition(": ")[2],
    )


class AsyncEnqueueCommands:
    """The enqueue as a raw command, for the async callers (:mod:`rpc_tasks.aio`); a part of
    :class:`BlockingRedisBroker`."""

    def enqueue_command(self, message: Message[Any]) -> tuple[Any, ...]:
        """The enqueue of ``message`` (no delay) as one raw command, for a caller that runs it
        on another client (:mod:`rpc_tasks.aio` runs it on ``redis.asyncio``): the same
        ``EVALSHA`` of the enqueue script, with the same arguments, as :meth:`do_enqueue`.

        ``message`` must be freshly built for this enqueue: it gets its ``redis_message_id``
        option in place. The ``before_enqueue`` hooks run here; the caller runs the command,
        then ``broker.emit_after("enqueue", message, None)``. On ``NoScriptError`` (the server
        lost its script cache) the caller falls back to :meth:`do_enqueue`, which loads it."""
        self.prepare_enqueue(message)
        return self.enqueue_command_of(message)

    def prepare_enqueue(self, message: Message[Any]) -> None:
        """:meth:`enqueue_command`'s first half: give ``message`` its ``redis_message_id`` and
        run the ``before_enqueue`` hooks (in the caller's context). The second half,
        :meth:`enqueue_command_of`, may run later (the async callers' pipe encodes a message
        only when it sends it, so 10,000 queued calls hold no encoded copy meanwhile)."""
        broker: Any = self  # a BlockingRedisBroker
        message.options["redis_message_id"] = str(uuid4())
        broker.emit_before("enqueue", message, None)

    def enqueue_command_of(self, message: Message[Any]) -> tuple[Any, ...]:
        """:meth:`enqueue_command`'s second half: the command of a prepared ``message``."""
        broker: Any = self  # a BlockingRedisBroker
        rid = message.options["redis_message_id"]
        args = broker._enqueue_args(message.queue_name, rid, message.encode())
        return ("EVALSHA", broker.scripts["dispatch_rpc"].sha, 1, broker.namespace, *args)


class BlockingRedisBroker(AsyncEnqueueCommands, RedisBroker):
    """Drop-in replacement for ``dramatiq.brokers.redis.RedisBroker`` (same arguments).

    Raises ``RuntimeError`` when built on a Dramatiq whose internals changed (see
    :data:`INTERNALS_PROBLEM`); :func:`redis_broker` falls back to ``RedisBroker`` instead."""

    @property
    def consumer_class(self) -> type[Any]:
        return _BlockingConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return _BlockingConsumer(self, queue_name, prefetch, timeout)

    def _dispatch_args(
        self, command: str, queue_name: str, *args: Any, maintenance: bool | None = None
    ) -> list[Any]:
        # The argument list of Dramatiq's dispatch script (see RedisBroker._dispatch).
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            internals.maintenance_flag(self, command) if maintenance is None else int(maintenance),
            internals.max_unpack_size(self),
            *args,
        ]

    def _enqueue_args(self, queue_name: str, message_id: str, data: bytes) -> list[Any]:
        return self._dispatch_args("enqueue", queue_name, message_id, data)

    def __init__(
        self,
        *,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        **kwargs: Any,
    ) -> None:
        if INTERNALS_PROBLEM is not None:
            raise RuntimeError(
                f"BlockingRedisBroker cannot run on Dramatiq {dramatiq.__version__}: {INTERNALS_PROBLEM}"
            )
        kwargs.setdefault("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_MS)
        url = kwargs.get("url")
        if isinstance(url, str) and topology.is_topology_url(url):  # scale-out (issue 18)
            kwargs, wait_replicas = topology.broker_options(kwargs, wait_replicas)
        super().__init__(**kwargs)
        #: Scale-out (issue 18): after each ``.send()`` enqueue, ``WAIT`` until this many replicas
        #: have the message (0: don't); :func:`rpc_tasks.redis.dispatch.enqueue_replicated`.
        self.wait_replicas = wait_replicas
        #: How long that ``WAIT`` may take (ms) before the enqueue is reported unconfirmed.
        self.wait_timeout_ms = wait_timeout_ms
        #: Largest message a consumer decodes (bytes); larger ones are dead-lettered unread.
        self.max_message_bytes = max_message_bytes
        #: Whether Dramatiq's log lines may show message params (``log_rpc_params``).
        self.log_message_params = False
        self._maintenance = Maintenance(self)
        self.scripts["dispatch_rpc"] = self.client.register_script(rpc_dispatch_source())
        # .call() replies waiting to go out with their message's ack (id -> key, payload, ttl, actor).
        self._pending_replies: dict[str, tuple[str, bytes, int, str]] = {}
        self._same_redis: weakref.WeakKeyDictionary[redis.Redis, bool] = weakref.WeakKeyDictionary()

    def enqueue_many(self, messages: list[Message[Any]]) -> list[Message[Any]]:
        """Enqueue (without delay) many messages in one round trip; same middleware hooks as
        ``enqueue``. Used by ``RPCActor.call_many``."""
        prepared: list[Message[Any]] = []
        for message in messages:
            message = message.copy(options={"redis_message_id": str(uuid4())})
            self.emit_before("enqueue", message, None)
            prepared.append(message)
        script = self.scripts["dispatch_rpc"]
        with self.client.pipeline(transaction=False) as pipe:
            for message in prepared:
                rid = message.options["redis_message_id"]
                args = self._enqueue_args(message.queue_name, rid, message.encode())
                pipe.evalsha(script.sha, 1, self.namespace, *args)
            results = pipe.execute(raise_on_error=False)
        failed: Exception | None = None
        for message, result in zip(prepared, results, strict=True):
            if isinstance(result, NoScriptError):
                # The server lost its script cache (restart, SCRIPT FLUSH): enqueue again only
                # the messages that did not go in (the script loads itself on this call).
                self.do_enqueue(message.queue_name, message.options["redis_message_id"], message.encode())
            elif isinstance(result, Exception) and failed is None:
                failed = result
        if failed is not None:
            raise failed
        for message in prepared:
            self.emit_after("enqueue", message, None)
        return prepared

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> Any:
        """Dramatiq's enqueue plus a wake-up token: one script, one round trip (with
        ``wait_replicas``, a ``WAIT`` in the same write)."""
        if self.wait_replicas > 0:
            enqueue = ("EVALSHA", self.scripts["dispatch_rpc"].sha, 1, self.namespace)
            args = self._enqueue_args(queue_name, message_id, data)
            return enqueue_replicated(self, self.scripts["dispatch_rpc"], (*enqueue, *args))
        return self.scripts["dispatch_rpc"](
            keys=[self.namespace], args=self._enqueue_args(queue_name, message_id, data)
        )

    def _shares_redis(self, client: redis.Redis) -> bool:
        same = self._same_redis.get(client)
        if same is None:
            same = self._same_redis[client] = same_redis(self.client, client)
        return same

    def enqueue_and_wait(
        self, message: Message[Any], channel: ReplyChannel, key: str, timeout: float
    ) -> bytes | None:
        """Enqueue a ``.call()`` message and wait for its reply on ``key``: when the reply
        channel is on the broker's Redis, the enqueue script and the ``BLPOP`` go out in one
        write (one round trip for the caller). Same middleware hooks as :meth:`enqueue`.
        ``message`` must be freshly built for this call: it gets its ``redis_message_id``
        option in place. Returns the raw reply, ``None`` on timeout (and without enqueueing
        when ``timeout`` already ran out)."""
        if timeout <= 0:
            return None  # already expired (e.g. slow params validation): nothing is enqueued
        if not self._shares_redis(channel.client):
            self.enqueue(message)
            return channel.wait(key, timeout)
        started = time.monotonic()
        # ``message`` is a fresh ``.call()`` message that only its caller holds: its Redis id
        # goes in place, where Dramatiq's ``enqueue`` would copy the message.
        rid = message.options["redis_message_id"] = str(uuid4())
        self.emit_before("enqueue", message, None)
        data = message.encode()
        args = self._enqueue_args(message.queue_name, rid, data)
        enqueue = ("EVALSHA", self.scripts["dispatch_rpc"].sha, 1, self.namespace, *args)
        try:
            return channel.wait(
                key, timeout, first=enqueue, on_first=lambda _: self.emit_after("enqueue", message, None)
            )
        except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
            self.do_enqueue(message.queue_name, rid, data)
            self.emit_after("enqueue", message, None)
            return channel.wait(key, timeout - (time.monotonic() - started))

    def defer_reply(self, message: Any, key: str, payload: bytes, ttl: int, client: redis.Redis) -> bool:
        """Hold a ``.call()`` reply until ``message`` is acked and push it in the same round
        trip as the ack (one round trip per call less on the worker). Only when the reply
        channel's ``client`` talks to the same Redis server and database as the broker;
        returns ``False`` (the caller pushes the reply itself) otherwise."""
        redis_message_id = message.options.get("redis_message_id")
        if not isinstance(redis_message_id, str):
            return False
        if not self._shares_redis(client):
            return False
        self._pending_replies[redis_message_id] = (key, payload, ttl, str(message.actor_name))
        return True

    def finish(self, command: str, queue_name: str, redis_message_id: str) -> None:
        """``ack``/``nack`` a message, pushing its deferred reply (if any) atomically with it."""
        if command != "ack":  # a message that failed after all: its success reply must not go out
            self._pending_replies.pop(redis_message_id, None)
        reply = self._pending_replies.get(redis_message_id)
        if reply is None:  # Dramatiq's own ack/nack
            getattr(self, f"do_{command}")(queue_name, redis_message_id)
            return
        outcome = self._dispatch_pinned(
            command, queue_name, redis_message_id, *reply[:3], script_name="dispatch_rpc"
        )
        self._pending_replies.pop(redis_message_id, None)
        if isinstance(outcome, bytes) and outcome.startswith(b"rpc_reply_failed"):
            _reply_push_failed(redis_message_id, queue_name, reply, outcome)

    def _dispatch_pinned(
        self, command: str, queue_name: str, *args: Any, script_name: str = "dispatch"
    ) -> Any:
        """Dramatiq's dispatch script (or our wrapper of it) on this thread's own connection
        (worker and consumer threads are long-lived; a pool checkout costs a readiness poll and
        two getpid calls)."""
        return self._dispatch_pinned_args(self._dispatch_args(command, queue_name, *args), script_name)

    def do_ack(self, queue_name: str, redis_message_id: str) -> Any:
        """Dramatiq's ``ack`` (same script), on the calling thread's own connection."""
        return self._dispatch_pinned("ack", queue_name, redis_message_id)

    def do_nack(self, queue_name: str, redis_message_id: str) -> Any:
        """Dramatiq's ``nack`` (same script), on the calling thread's own connection."""
        return self._dispatch_pinned("nack", queue_name, redis_message_id)

    def drop_deferred_reply(self, redis_message_id: str) -> None:
        """Forget a deferred reply whose ack failed for good."""
        self._pending_replies.pop(redis_message_id, None)

    def fetch_with_ids(self, queue_name: str, count: int) -> list[tuple[str, bytes | None]]:
        """Fetch up to ``count`` messages of ``queue_name`` now: (Redis id, data) pairs (data
        ``None`` for an id whose message is gone)."""
        args = self._dispatch_args("fetch", queue_name, count, "ids", maintenance=False)
        return fetched_pairs(self._dispatch_pinned_args(args, "dispatch_rpc"))

    def wait_and_fetch(
        self, queue_name: str, count: int, seconds: float, *, exact: bool = False
    ) -> list[tuple[str, bytes | None]] | None:
        """Block up to ``seconds`` for a wake-up token of ``queue_name``, then fetch up to
        ``count`` messages, in one round trip: ``BLPOP`` and the fetch script are pipelined on
        one connection, so Redis runs the fetch the moment the ``BLPOP`` returns (with a token
        or on its timeout, which doubles as the idle heartbeat). Returns (Redis id, data)
        pairs. ``exact`` (the delay-queue consumer waiting for an eta it holds): the wait is
        cut on the client side at ``seconds`` (Redis times blocking commands out only every
        ``1/hz`` s, 100 ms by default) by dropping the connection, which cancels the ``BLPOP``
        and the fetch behind it; then ``None`` is returned."""
        script = self.scripts["dispatch_rpc"]
        timeout = max(0.001, round(seconds, 3))
        fetch = self._dispatch_args("fetch", queue_name, count, "ids", maintenance=False)
        commands = [
            ("BLPOP", wake_key(self.namespace, queue_name), timeout),
            ("EVALSHA", script.sha, 1, self.namespace, *fetch),
        ]
        try:
            if exact:
                return self._wait_exactly(commands, timeout)
            # Waited for with the BLPOP's own timeout, whatever the client's socket_timeout.
            return fetched_pairs(pipelined(self.client, commands, pinned=True, wait=timeout)[1])
        except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
            return fetched_pairs(script(keys=[self.namespace], args=fetch))

    def _wait_exactly(
        self, commands: list[tuple[Any, ...]], timeout: float
    ) -> list[tuple[str, bytes | None]] | None:
        conn: Any = thread_connection(self.client)
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            if not wait_readable(conn, time.monotonic() + timeout):
                conn.disconnect()  # cancels the BLPOP and the fetch queued behind it
                return None
            conn.read_response()
            result = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        return fetched_pairs(result)

    def _dispatch_pinned_args(self, full: list[Any], script_name: str) -> Any:
        script = self.scripts[script_name]
        try:
            return pipelined(self.client, [("EVALSHA", script.sha, 1, self.namespace, *full)], pinned=True)[0]
        except NoScriptError:  # the server lost its script cache: load it and run it again
            return script(keys=[self.namespace], args=full)

    # -- maintenance -----------------------------------------------------------------------------

    def requeue_strays(self, queue_name: str, held: set[str]) -> int:
        """Requeue the messages of this worker's ack set for ``queue_name`` that its consumer
        does not hold (``held``): a fetch whose reply was lost on a broken connection (or with
        a wait cut on this side) left them there, and with this process's heartbeat alive
        nothing else would requeue them. One ``SCARD`` when there is none.
        Returns how many were requeued (Dramatiq's ``requeue`` command)."""
        acks = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        if self.client.scard(acks) <= len(held):  # what it holds is all there is: no stray
            return 0
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(acks)}
        strays = sorted(members - held)
        if strays:
            logger.warning(
                "Requeueing %d message(s) of queue %r fetched on a lost or cut reply.",
                len(strays),
                queue_name,
            )
            self.do_requeue(queue_name, *strays)
        return len(strays)

    def watch_queue(self, queue_name: str) -> None:
        """Include ``queue_name`` in this process's periodic maintenance (called by each
        consumer; starts the maintenance thread on first use)."""
        self._maintenance.watch(queue_name)

    def run_maintenance(self, queue_name: str) -> None:
        """Run Dramatiq's maintenance for ``queue_name`` now, through Dramatiq's own dispatch
        script: requeue the unacked messages of workers whose heartbeat is older than
        ``heartbeat_timeout``, drop expired dead letters; also refreshes this process's
        heartbeat."""
        self._dispatch_pinned_args(
            self._dispatch_args(MAINTENANCE_COMMAND, queue_name, maintenance=True), "dispatch"
        )

    def close(self) -> None:
        """Stop the maintenance thread, then close as Dramatiq does."""
        self._maintenance.stop()
        super().close()
