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
* the delay-queue consumer never sleeps past the earliest ``eta`` it holds, so delayed messages
  (retries, postponements) are handed over on time.

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

import inspect
import logging
import threading
import time
import weakref
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq import Message
from dramatiq.brokers import redis as _dramatiq_redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed, ConnectionFailed
from redis.exceptions import NoScriptError

from . import topology
from .connection import pipelined, same_redis
from .replies import ReplyChannel

logger = logging.getLogger(__name__)

#: Newest Dramatiq release this module was tested with (``pyproject.toml`` caps it the same).
TESTED_DRAMATIQ = "2.2"


def _internals_problem() -> str | None:
    """What no longer has the shape this module relies on, or ``None``.

    This is the only module of rpc-tasks that touches Dramatiq's private names: the Redis
    consumer class ``_RedisConsumer`` (and its ``message_cache`` / ``queued_message_ids`` /
    ``outstanding_message_count``), the ``_scripts`` dict with ``dispatch.lua`` and the
    argument layout of that script (``command, timestamp, queue_name, worker_id,
    heartbeat_timeout, dead_message_ttl, do_maintenance, max_unpack_size, ...``), and
    ``RedisBroker._should_do_maintenance`` / ``_max_unpack_size``."""
    consumer: Any = getattr(_dramatiq_redis, "_RedisConsumer", None)
    if not isinstance(consumer, type):
        return "dramatiq.brokers.redis._RedisConsumer is gone"
    init: Any = vars(consumer).get("__init__")
    try:
        params = list(inspect.signature(init).parameters)
    except (TypeError, ValueError):
        return "_RedisConsumer.__init__ cannot be inspected"
    if params != ["self", "broker", "queue_name", "prefetch", "timeout"]:
        return f"_RedisConsumer.__init__ takes {params[1:]}"
    if not isinstance(inspect.getattr_static(consumer, "outstanding_message_count", None), property):
        return "_RedisConsumer.outstanding_message_count is not a property"
    try:
        source = inspect.getsource(init)
    except (OSError, TypeError):
        source = "self.message_cache self.queued_message_ids"  # no source shipped: trust the rest
    if "self.message_cache" not in source or "self.queued_message_ids" not in source:
        return "_RedisConsumer no longer keeps message_cache / queued_message_ids"
    scripts = getattr(_dramatiq_redis, "_scripts", None)
    dispatch = scripts.get("dispatch") if isinstance(scripts, dict) else None
    if isinstance(dispatch, str):
        dispatch = dispatch.encode()
    if not isinstance(dispatch, bytes):
        return "dramatiq.brokers.redis._scripts['dispatch'] is gone"
    for line in (
        b"local command = ARGV[1]",
        b"local queue_name = ARGV[3]",
        b"local max_unpack_size = ARGV[8]",
    ):
        if line not in dispatch:
            return f"dispatch.lua no longer has {line.decode()!r}"
    for name in ("_should_do_maintenance", "_max_unpack_size", "_dispatch"):
        if not callable(getattr(RedisBroker, name, None)):
            return f"RedisBroker.{name} is gone"
    return None


#: Why ``BlockingRedisBroker`` cannot run on the installed Dramatiq (``None``: it can).
INTERNALS_PROBLEM = _internals_problem()
_RedisConsumer: type[Any] = getattr(_dramatiq_redis, "_RedisConsumer", object)


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


#: Wake-up tokens kept per queue (more would only cause empty fetches).
WAKE_LIST_LENGTH = 64


def _rpc_dispatch_source() -> bytes:
    """Dramatiq's own ``dispatch.lua`` (loaded from the installed package, not copied), wrapped
    so that, atomically with the wrapped command,

    * an ``enqueue`` also pushes a capped wake-up token;
    * an ``ack`` given three extra arguments (reply key, reply, TTL in seconds) also pushes
      that ``.call()`` reply with its TTL (``LPUSH`` + ``EXPIRE``).
    """
    body = _dramatiq_redis._scripts["dispatch"]
    if isinstance(body, str):
        body = body.encode()
    return (
        b"local function rpc_tasks_dispatch()\n" + body + b"\nend\n"
        b"local result = rpc_tasks_dispatch()\n"
        b"if ARGV[1] == 'enqueue' then\n"
        b"  local wake = KEYS[1] .. ':' .. ARGV[3] .. '.wake'\n"
        b"  redis.call('lpush', wake, '1')\n"
        b"  redis.call('ltrim', wake, 0, " + str(WAKE_LIST_LENGTH - 1).encode() + b")\n"
        b"elseif ARGV[1] == 'ack' and ARGV[12] then\n"
        b"  redis.call('lpush', ARGV[10], ARGV[11])\n"
        b"  redis.call('expire', ARGV[10], ARGV[12])\n"
        b"end\n"
        b"return result\n"
    )


def wake_key(namespace: str, queue_name: str) -> str:
    """The wake-up list of ``queue_name`` (a delay queue ``<queue>.DQ`` has its own,
    ``<queue>.DQ.wake``, pushed when a delayed message is enqueued)."""
    return f"{namespace}:{queue_name}.wake"


class BlockingRedisBroker(RedisBroker):
    """Drop-in replacement for ``dramatiq.brokers.redis.RedisBroker`` (same arguments).

    Raises ``RuntimeError`` when built on a Dramatiq whose internals changed (see
    :data:`INTERNALS_PROBLEM`); :func:`redis_broker` falls back to ``RedisBroker`` instead."""

    @property
    def consumer_class(self) -> type[Any]:
        return _BlockingConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return _BlockingConsumer(self, queue_name, prefetch, timeout)

    def _dispatch_args(self, command: str, queue_name: str, *args: Any) -> list[Any]:
        # The argument list of Dramatiq's dispatch script (see RedisBroker._dispatch).
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance(command),
            self._max_unpack_size(),
            *args,
        ]

    def _enqueue_args(self, queue_name: str, message_id: str, data: bytes) -> list[Any]:
        return self._dispatch_args("enqueue", queue_name, message_id, data)

    def __init__(self, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000, **kwargs: Any) -> None:
        if INTERNALS_PROBLEM is not None:
            raise RuntimeError(
                f"BlockingRedisBroker cannot run on Dramatiq {dramatiq.__version__}: {INTERNALS_PROBLEM}"
            )
        url = kwargs.get("url")
        if isinstance(url, str) and topology.is_topology_url(url):  # scale-out (issue 18)
            kwargs, wait_replicas = topology.broker_options(kwargs, wait_replicas)
        super().__init__(**kwargs)
        self.scripts["dispatch_rpc"] = self.client.register_script(_rpc_dispatch_source())
        # .call() replies waiting to go out with their message's ack (redis_message_id -> reply).
        self._pending_replies: dict[str, tuple[str, bytes, int]] = {}
        self._same_redis: weakref.WeakKeyDictionary[redis.Redis, bool] = weakref.WeakKeyDictionary()
        #: Scale-out (issue 18): after each ``.send()`` enqueue, ``WAIT`` until this many replicas
        #: have the message (0: don't). See :meth:`_enqueue_replicated`.
        self.wait_replicas = wait_replicas
        #: How long that ``WAIT`` may take (ms) before the enqueue is reported unconfirmed.
        self.wait_timeout_ms = wait_timeout_ms

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
        """Dramatiq's enqueue plus a wake-up token: one script, one round trip."""
        if self.wait_replicas > 0:
            return self._enqueue_replicated(queue_name, message_id, data)
        return self.scripts["dispatch_rpc"](
            keys=[self.namespace], args=self._enqueue_args(queue_name, message_id, data)
        )

    def _enqueue_replicated(self, queue_name: str, message_id: str, data: bytes) -> Any:
        """The enqueue script and ``WAIT wait_replicas wait_timeout_ms`` on one connection (one
        write): returns once that many replicas have the message, so a failover to one of them
        cannot lose it. Fewer in time: ``redis.ConnectionError`` (the caller sees
        ``RPCConnectionError``; the message *is* enqueued on the master, so sending it again
        may run it twice)."""
        script = self.scripts["dispatch_rpc"]
        args = self._enqueue_args(queue_name, message_id, data)
        enqueue = ("EVALSHA", script.sha, 1, self.namespace, *args)
        wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        try:
            result, acked = pipelined(self.client, [enqueue, wait])
        except NoScriptError:  # the server lost its script cache: load it, send both again
            self.client.script_load(script.script)
            result, acked = pipelined(self.client, [enqueue, wait])
        if int(acked) < self.wait_replicas:
            raise redis.ConnectionError(
                f"enqueued, but {acked} of {self.wait_replicas} replicas confirmed it within "
                f"{self.wait_timeout_ms} ms (wait_replicas)"
            )
        return result

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
        option in place. Returns the raw reply, ``None`` on timeout."""
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
        self._pending_replies[redis_message_id] = (key, payload, ttl)
        return True

    def finish(self, command: str, queue_name: str, redis_message_id: str) -> None:
        """``ack``/``nack`` a message, pushing its deferred reply (if any) atomically with it."""
        if command != "ack":  # a message that failed after all: its success reply must not go out
            self._pending_replies.pop(redis_message_id, None)
        reply = self._pending_replies.get(redis_message_id)
        if reply is None:  # Dramatiq's own ack/nack
            getattr(self, f"do_{command}")(queue_name, redis_message_id)
            return
        self._dispatch_pinned(command, queue_name, redis_message_id, *reply, script_name="dispatch_rpc")
        self._pending_replies.pop(redis_message_id, None)

    def _dispatch_pinned(
        self, command: str, queue_name: str, *args: Any, script_name: str = "dispatch"
    ) -> Any:
        """Dramatiq's dispatch script (or our wrapper of it) on this thread's own connection
        (worker and consumer threads are long-lived; a pool checkout costs a readiness poll and
        two getpid calls)."""
        script = self.scripts[script_name]
        full = self._dispatch_args(command, queue_name, *args)
        try:
            return pipelined(self.client, [("EVALSHA", script.sha, 1, self.namespace, *full)], pinned=True)[0]
        except NoScriptError:  # the server lost its script cache: load it and run it again
            return script(keys=[self.namespace], args=full)

    def do_ack(self, queue_name: str, redis_message_id: str) -> Any:
        """Dramatiq's ``ack`` (same script), on the calling thread's own connection."""
        return self._dispatch_pinned("ack", queue_name, redis_message_id)

    def do_nack(self, queue_name: str, redis_message_id: str) -> Any:
        """Dramatiq's ``nack`` (same script), on the calling thread's own connection."""
        return self._dispatch_pinned("nack", queue_name, redis_message_id)

    def drop_deferred_reply(self, redis_message_id: str) -> None:
        """Forget a deferred reply whose ack failed for good."""
        self._pending_replies.pop(redis_message_id, None)

    def wait_and_fetch(self, queue_name: str, count: int, seconds: float) -> list[bytes]:
        """Block up to ``seconds`` for a wake-up token of ``queue_name``, then fetch up to
        ``count`` messages, in one round trip: ``BLPOP`` and Dramatiq's fetch script are
        pipelined on one connection, so Redis runs the fetch the moment the ``BLPOP`` returns
        (with a token or on its timeout, which doubles as the idle heartbeat)."""
        script = self.scripts["dispatch"]
        timeout = max(0.001, round(seconds, 3))
        commands = [
            ("BLPOP", wake_key(self.namespace, queue_name), timeout),
            ("EVALSHA", script.sha, 1, self.namespace, *self._dispatch_args("fetch", queue_name, count)),
        ]
        try:
            # Waited for with the BLPOP's own timeout, whatever the client's socket_timeout.
            messages = pipelined(self.client, commands, pinned=True, wait=timeout)[1]
        except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
            messages = self.do_fetch(queue_name, count)
        return list(messages or [])

    # -- async callers (rpc_tasks.aio) ----------------------------------------------------------

    def enqueue_command(self, message: Message[Any]) -> tuple[Any, ...]:
        """The enqueue of ``message`` (no delay) as one raw command, for a caller that runs it
        on another client (:mod:`rpc_tasks.aio` runs it on ``redis.asyncio``): the same
        ``EVALSHA`` of the enqueue script, with the same arguments, as :meth:`do_enqueue`.

        ``message`` must be freshly built for this enqueue: it gets its ``redis_message_id``
        option in place. The ``before_enqueue`` hooks run here; the caller runs the command,
        then ``broker.emit_after("enqueue", message, None)``. On ``NoScriptError`` (the server
        lost its script cache) the caller falls back to :meth:`do_enqueue`, which loads it."""
        rid = message.options["redis_message_id"] = str(uuid4())
        self.emit_before("enqueue", message, None)
        args = self._enqueue_args(message.queue_name, rid, message.encode())
        return ("EVALSHA", self.scripts["dispatch_rpc"].sha, 1, self.namespace, *args)


class _BlockingConsumer(_RedisConsumer):  # type: ignore[misc]
    message_cache: list[bytes]

    def __init__(self, broker: BlockingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        # timeout=0 turns Dramatiq's idle sleep into sleep(0); we block on the wake list instead.
        super().__init__(broker, queue_name, prefetch, 0)
        self.broker: BlockingRedisBroker = broker
        self.block_seconds = max(0.001, timeout / 1000.0)
        self.is_delay_queue = queue_name.endswith(".DQ")
        self._room = threading.Event()
        self._etas: dict[str, float] = {}
        self._lock = threading.Lock()
        # True once a fetch returned fewer messages than asked for: the queue was empty then,
        # and every later enqueue pushes a wake-up token, so the next fetch may block first.
        self._drained = False
        self._handed_off = False

    def _block_for(self) -> float:
        if not self.is_delay_queue:
            return self.block_seconds
        with self._lock:
            earliest = min(self._etas.values(), default=None)
        if earliest is None:
            return self.block_seconds
        return max(0.0, min(self.block_seconds, earliest - time.time()))

    def _fetch(self, room: int) -> list[bytes] | None:
        """Fetch up to ``room`` messages; ``None`` when it slept until a delayed message's eta."""
        if not self._drained:
            return list(self.broker.do_fetch(self.queue_name, room) or [])
        if self._handed_off:
            # The last message was just put on the work queue and this thread is about to
            # block: let the worker thread woken for it take the GIL now rather than at this
            # thread's next I/O (halves the hand-over here, ~120 -> ~60 us).
            self._handed_off = False
            time.sleep(0)  # releases the GIL
        block = self._block_for()
        if self.is_delay_queue and block < self.block_seconds:
            # Waiting for a known eta: sleep exactly (Redis times out blocking commands only
            # every 1/hz s, 100 ms by default, which would bunch delayed messages together).
            time.sleep(block)
            self._drained = False
            return None
        return self.broker.wait_and_fetch(self.queue_name, room, block)

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
                messages = self._fetch(room)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ConnectionClosed(exc) from None
            if messages is None:
                return None
            self._drained = len(messages) < room
            if not messages:
                return None
            self.message_cache = messages
        # Dramatiq's own path takes the message from the cache (decode, bookkeeping).
        message = super().__next__()
        self._handed_off = message is not None
        if message is not None and self.is_delay_queue:
            eta = message.options.get("eta")
            if isinstance(eta, (int, float)):
                with self._lock:
                    self._etas[message.message_id] = eta / 1000.0
        return message

    def _done(self, message: Any) -> None:
        if self.is_delay_queue:
            with self._lock:
                self._etas.pop(message.message_id, None)
        self._room.set()

    def ack(self, message: Any) -> None:
        self._finish("ack", message)

    def nack(self, message: Any) -> None:
        self._finish("nack", message)

    def _finish(self, command: str, message: Any) -> None:
        redis_message_id = message.options["redis_message_id"]
        try:
            # The current queue may differ from message.queue_name (delayed messages): finish
            # on the consumer's queue, as Dramatiq does.
            self.broker.finish(command, self.queue_name, redis_message_id)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Dramatiq retries post-processing on connection errors: keep the deferred reply.
            raise ConnectionClosed(exc) from None
        except (ConnectionClosed, ConnectionFailed):
            raise
        except BaseException:
            self.broker.drop_deferred_reply(redis_message_id)
            raise
        finally:
            self.queued_message_ids.discard(message.message_id)
            self._done(message)
