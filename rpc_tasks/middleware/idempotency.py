"""``RPCIdempotency``: idempotent actors run once, even when their message is delivered twice.

Dramatiq delivers at least once: a worker killed after a run completed but before its ack, a
lost ack, a redelivery after a requeue, or a ``.send()`` retried after a lost answer all run a
message again. For an actor declared ``@rpc_actor(idempotent=True)`` (key: the message id,
which survives redelivery, requeue and retries of the enqueue) or a message sent with an
``idempotency_key`` option (``actor.send(params, idempotency_key="order-42")``, key: that
string, shared by every message carrying it):

* the first run takes a lock in Redis (``SET NX`` with a TTL of ``lock_ttl`` seconds, 10 by
  default, renewed every third of that while the run goes on, so it lapses soon after its
  process died: by the time Dramatiq requeues a dead worker's message);
* when the run succeeds, its result is stored (TTL ``idempotency_ttl``, one day by default)
  and the lock released, in one script, *before* the message is acked: a delivery that comes
  after finds the stored result and returns it without running (a ``.call()`` caller gets it
  as the reply);
* a duplicate that arrives while the first run is going waits for its result (polling, up to
  ``idempotency_wait`` seconds), then returns it; if the first run failed or died meanwhile,
  the duplicate runs; still going after the wait, the duplicate is postponed by a second;
* a run that fails releases the lock (Dramatiq's retries run again; a failure is not stored).

A run that died mid-way (SIGKILL, OOM) may have done part of its work and runs again once its
lock lapses: idempotency here means "never twice after a completed run, never two at once",
not exactly-once side effects. Costs one Redis round trip before and one after each run of an
idempotent actor; other actors pay nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, SkipMessage

from .. import context, protocol
from ..config import WebSocketRPCConfig, get_config
from . import order

logger = logging.getLogger(__name__)

#: Message option: an idempotency key chosen by the sender.
OPTION_IDEMPOTENCY_KEY = "idempotency_key"
#: Key in the message context's ``extra`` holding a stored result to return instead of running.
STORED_RESULT = "rpc_stored_result"
#: Prefix of the lock and result keys in Redis.
KEY_PREFIX = "rpc:idem:"
#: Key in the message context's ``extra``: (result key, lock key, token) of the lock this run holds.
_HELD = "rpc_idempotency_lock"


def _take_held() -> tuple[str, str, str] | None:
    ctx = context.current()
    if ctx is None:
        return None
    held: tuple[str, str, str] | None = ctx.extra.pop(_HELD, None)
    return held


# KEYS: result, lock. ARGV: token, lock TTL ms. -> {"done", result} | {"run"} | {"busy"}
_ACQUIRE = """
local stored = redis.call('get', KEYS[1])
if stored then return {'done', stored} end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'run'} end
return {'busy'}
"""
# KEYS: result, lock. ARGV: token, result, TTL s. Stores the result, frees the lock if ours.
_COMPLETE = """
redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
return 1
"""
# KEYS: lock. ARGV: token, TTL ms (0: release). Renews or releases the lock if it is ours.
_TOUCH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('del', KEYS[1]) end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""


class RPCIdempotency(Middleware):
    """See the module docstring.

    Parameters:
      config: settings (``redis_url``, ``idempotency_ttl``, ``idempotency_wait``); default:
        :func:`rpc_tasks.config.get_config`.
      redis_client: a redis-py client for the lock and result keys (overrides the config's).
      lock_ttl: seconds a run's lock outlives its last renewal (renewed every third of that).
        Keep it at most the broker's ``heartbeat_timeout`` (10 s by default): then the lock of
        a worker that died has lapsed by the time its message is requeued, and the redelivery
        runs at once instead of waiting for it.
    """

    rpc_role = order.IDEMPOTENCY

    def __init__(
        self, config: WebSocketRPCConfig | None = None, *, redis_client: Any = None, lock_ttl: float = 10.0
    ) -> None:
        self._config = config
        self._client = redis_client
        self.lock_ttl = lock_ttl
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # lock key -> token, renewed while the run goes on
        self._renewer: threading.Thread | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def actor_options(self) -> set[str]:
        return {"idempotent"}

    @property
    def config(self) -> WebSocketRPCConfig:
        """The effective settings (resolved on first use)."""
        if self._config is None:
            self._config = get_config()
        return self._config

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            if self._client is None:
                from ..redis.connection import client_from_config

                self._client = client_from_config(self.config)
            script = self._scripts[name] = self._client.register_script(source)
        return script

    # -- keys ----------------------------------------------------------------------------------

    def key_of(self, broker: dramatiq.Broker, message: Any) -> str | None:
        """The idempotency key of ``message`` (``None``: not idempotent)."""
        explicit = message.options.get(OPTION_IDEMPOTENCY_KEY)
        if isinstance(explicit, str):
            return f"{message.actor_name}:k:{explicit}"
        actor = broker.actors.get(message.actor_name)
        if actor is not None and actor.options.get("idempotent"):
            return f"{message.actor_name}:m:{message.message_id}"
        return None

    # -- hooks ---------------------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        key = self.key_of(broker, message)
        if key is None:
            return
        result_key, lock_key = KEY_PREFIX + key + ":result", KEY_PREFIX + key + ":lock"
        token = uuid.uuid4().hex
        give_up = time.monotonic() + self.config.idempotency_wait
        acquire = self._script("acquire", _ACQUIRE)
        while True:
            outcome = acquire(keys=[result_key, lock_key], args=[token, int(self.lock_ttl * 1000)])
            state = outcome[0].decode() if isinstance(outcome[0], bytes) else str(outcome[0])
            if state == "done":
                logger.info(
                    "Message %s of %r already ran (idempotency key %s): returning the stored result.",
                    message.message_id,
                    message.actor_name,
                    key,
                )
                ctx = context.current()
                if ctx is not None:
                    ctx.extra[STORED_RESULT] = json.loads(outcome[1])
                return
            if state == "run":
                ctx = context.current()
                if ctx is not None:
                    ctx.extra[_HELD] = (result_key, lock_key, token)
                self._hold(lock_key, token)
                return
            if time.monotonic() >= give_up:
                logger.warning(
                    "Message %s of %r: another run of idempotency key %s is still going after "
                    "%.0fs; postponed by 1 s.",
                    message.message_id,
                    message.actor_name,
                    key,
                    self.config.idempotency_wait,
                )
                options = {k: v for k, v in message.options.items() if k != "eta"}
                broker.enqueue(message.copy(options=options), delay=1000)
                raise SkipMessage("a run with the same idempotency key is in progress")
            time.sleep(0.05)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        held = _take_held()
        if held is None:
            return
        result_key, lock_key, token = held
        self._release_local(lock_key)
        if exception is None and not message.failed:
            ctx = context.current()
            value = ctx.result if ctx is not None and ctx.has_result else result
            stored = json.dumps(protocol.model_to_wire(value), separators=(",", ":"))
            self._script("complete", _COMPLETE)(
                keys=[result_key, lock_key], args=[token, stored, self.config.idempotency_ttl]
            )
        else:
            self._script("touch", _TOUCH)(keys=[lock_key], args=[token, 0])

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        held = _take_held()
        if held is not None:
            self._release_local(held[1])
            self._script("touch", _TOUCH)(keys=[held[1]], args=[held[2], 0])

    # -- lock renewal --------------------------------------------------------------------------

    def _hold(self, lock_key: str, token: str) -> None:
        with self._lock:
            self._held[lock_key] = token
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew, name="rpc-tasks-idempotency", daemon=True
                )
                self._renewer.start()

    def _release_local(self, lock_key: str) -> None:
        with self._lock:
            self._held.pop(lock_key, None)

    def _renew(self) -> None:
        while True:
            time.sleep(self.lock_ttl / 3)
            with self._lock:
                held = list(self._held.items())
            for lock_key, token in held:
                try:
                    self._script("touch", _TOUCH)(keys=[lock_key], args=[token, int(self.lock_ttl * 1000)])
                except Exception as exc:  # Redis down: the lock may lapse; say so
                    logger.warning("Could not renew idempotency lock %s: %s", lock_key, exc)
