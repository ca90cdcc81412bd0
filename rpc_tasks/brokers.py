"""``BlockingRedisBroker``: Dramatiq's ``RedisBroker`` whose idle consumers block instead of
polling.

Dramatiq's Redis consumer fetches with a Lua script, which cannot block, so an idle consumer
sleeps with a backoff of up to ``worker_timeout`` (1 s): a message sent to an idle worker waits
up to a second, and shorter timeouts burn CPU. Here every enqueue also pushes a wake-up token
on ``<namespace>:<queue>.wake`` (in the same round trip), and an idle consumer waits on that
list with ``BLPOP`` (up to ``worker_timeout``), then fetches as usual. Everything else, the
queues, acks, requeue of dead workers' messages, delayed messages, dead letters, is Dramatiq's own
Lua scripts, unchanged:

* tokens are only hints: a consumer always fetches after waking and only waits when a fetch
  came back empty, so a lost or extra token costs at most one ``worker_timeout`` or one empty
  fetch; the wake list is capped (``LTRIM``) so it never grows while consumers are busy;
* a consumer that holds its full prefetch waits for one of its messages to be acked instead;
* the delay-queue consumer never sleeps past the earliest ``eta`` it holds, so delayed messages
  (retries, postponements) are handed over on time.

Idle cost per queue: one ``BLPOP`` and one fetch per ``worker_timeout`` for the queue and for its
delay queue (about 4 Redis commands per second with the default 1 s).
"""

from __future__ import annotations

import threading
import time
from typing import Any
from uuid import uuid4

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis
from redis.exceptions import NoScriptError

#: Wake-up tokens kept per queue (more would only cause empty fetches).
WAKE_LIST_LENGTH = 64


def _dispatch_and_wake_source() -> bytes:
    """Dramatiq's own ``dispatch.lua`` (loaded from the installed package, not copied), wrapped
    so that an ``enqueue`` also pushes a capped wake-up token, atomically."""
    from dramatiq.brokers import redis as dramatiq_redis

    body = dramatiq_redis._scripts["dispatch"]
    return (
        b"local function rpc_tasks_dispatch()\n" + body + b"\nend\n"
        b"local result = rpc_tasks_dispatch()\n"
        b"if ARGV[1] == 'enqueue' then\n"
        b"  local wake = KEYS[1] .. ':' .. ARGV[3] .. '.wake'\n"
        b"  redis.call('lpush', wake, '1')\n"
        b"  redis.call('ltrim', wake, 0, " + str(WAKE_LIST_LENGTH - 1).encode() + b")\n"
        b"end\n"
        b"return result\n"
    )


def wake_key(namespace: str, queue_name: str) -> str:
    """The wake-up list of ``queue_name`` (also for its ``.DQ`` delay queue)."""
    return f"{namespace}:{queue_name}.wake"


class BlockingRedisBroker(RedisBroker):
    """Drop-in replacement for ``dramatiq.brokers.redis.RedisBroker`` (same arguments)."""

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _BlockingConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return _BlockingConsumer(self, queue_name, prefetch, timeout)

    def _enqueue_args(self, queue_name: str, message_id: str, data: bytes) -> list[Any]:
        # The argument list of Dramatiq's dispatch script for "enqueue" (see RedisBroker._dispatch).
        return [
            "enqueue",
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance("enqueue"),
            self._max_unpack_size(),
            message_id,
            data,
        ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scripts["dispatch_wake"] = self.client.register_script(_dispatch_and_wake_source())

    def enqueue_many(self, messages: list[Message[Any]]) -> list[Message[Any]]:
        """Enqueue (without delay) many messages in one round trip; same middleware hooks as
        ``enqueue``. Used by ``RPCActor.call_many``."""
        prepared: list[Message[Any]] = []
        for message in messages:
            message = message.copy(options={"redis_message_id": str(uuid4())})
            self.emit_before("enqueue", message, None)
            prepared.append(message)
        script = self.scripts["dispatch_wake"]
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for message in prepared:
                    args = self._enqueue_args(
                        message.queue_name, message.options["redis_message_id"], message.encode()
                    )
                    pipe.evalsha(script.sha, 1, self.namespace, *args)
                pipe.execute()
        except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
            for message in prepared:
                self.do_enqueue(message.queue_name, message.options["redis_message_id"], message.encode())
        for message in prepared:
            self.emit_after("enqueue", message, None)
        return prepared

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> Any:
        """Dramatiq's enqueue plus a wake-up token: one script, one round trip."""
        return self.scripts["dispatch_wake"](
            keys=[self.namespace], args=self._enqueue_args(queue_name, message_id, data)
        )

    def wait_for_work(self, queue_name: str, seconds: float) -> bool:
        """Block up to ``seconds`` for a wake-up token of ``queue_name``."""
        if seconds <= 0:
            return False
        popped = self.client.blpop(
            [wake_key(self.namespace, queue_name)], timeout=max(0.001, round(seconds, 3))
        )
        return popped is not None


class _BlockingConsumer(_RedisConsumer):
    def __init__(self, broker: BlockingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        # timeout=0 turns Dramatiq's idle sleep into sleep(0); we block on the wake list instead.
        super().__init__(broker, queue_name, prefetch, 0)
        self.block_seconds = max(0.001, timeout / 1000.0)
        self.is_delay_queue = queue_name.endswith(".DQ")
        self._room = threading.Event()
        self._etas: dict[str, float] = {}
        self._lock = threading.Lock()

    def _block_for(self) -> float:
        if not self.is_delay_queue:
            return self.block_seconds
        with self._lock:
            earliest = min(self._etas.values(), default=None)
        if earliest is None:
            return self.block_seconds
        return max(0.0, min(self.block_seconds, earliest - time.time()))

    def __next__(self) -> Any:
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            # Saturated: wait until one of our messages is acked/nacked (or the timeout).
            self._room.clear()
            if self.outstanding_message_count >= self.prefetch:
                self._room.wait(self._block_for())
            return None
        fetch_expected = not self.message_cache
        message = super().__next__()
        if message is None and fetch_expected and not self.message_cache:
            block = self._block_for()
            if self.is_delay_queue and block < self.block_seconds:
                # Waiting for a known eta: sleep exactly (Redis times out blocking commands only
                # every 1/hz s, 100 ms by default, which would bunch delayed messages together).
                time.sleep(block)
            elif self.broker.wait_for_work(self.queue_name, block):
                message = super().__next__()
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
        try:
            super().ack(message)
        finally:
            self._done(message)

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)
        finally:
            self._done(message)
