"""Shared rate-limit state in Redis: cooldowns and the fleet-wide proactive limiter.

Used by :class:`~rpc_tasks.middleware.RPCRateLimits`. Both run as Lua scripts on Redis server
time, so worker clocks do not matter.

Redis Cluster: every key embeds its rate-limit key as a hash tag (``...:tat:{crm-api}``), so each
script touches one slot; the local view of cooldowns is built from Pub/Sub (cluster-wide) plus
one ``PTTL`` per key on first use, never ``SCAN`` (which would see one node only).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from redis.exceptions import RedisError

from ..exceptions import RPCConnectionError

logger = logging.getLogger(__name__)

#: Prefix of shared rate-limit state in Redis (cooldowns and proactive limits).
RATE_KEY_PREFIX = "rpc_tasks:rate:"
#: Pub/Sub channel on which opened cooldowns are announced (``<cooldown key>|<ms left>``), for
#: Redis database 0; database N uses ``<this>:N`` (see :func:`events_channel_for`).
RATE_EVENTS_CHANNEL = f"{RATE_KEY_PREFIX}events"
#: Seconds between two passes that drop ended cooldowns from a process's local view.
PRUNE_INTERVAL = 1.0
#: Keys whose absence of a cooldown was checked (``PTTL``) since the view connected, at most;
#: past it the set starts again (a key is then asked about once more).
CHECKED_KEYS_LIMIT = 100_000


def cooldown_key(rate_key: str) -> str:
    """Redis key of the shared cooldown for ``rate_key`` (its PTTL is the time left); the rate
    key is its hash tag."""
    return f"{RATE_KEY_PREFIX}cooldown:{{{rate_key}}}"


def limiter_keys(rate_key: str) -> tuple[str, str]:
    """Redis keys of a proactive limit: (admission TAT, reservation TAT). Both carry the rate
    key as their hash tag, so the limiter's script touches one Redis Cluster slot."""
    return f"{RATE_KEY_PREFIX}tat:{{{rate_key}}}", f"{RATE_KEY_PREFIX}reserve:{{{rate_key}}}"


# Open (or extend, never shorten) a cooldown: the key's PTTL is the time left. Announces the
# result on ARGV[3] so that workers keep a local view instead of asking Redis per message.
_OPEN_COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', want)
  left = want
end
redis.call('PUBLISH', ARGV[3], KEYS[1] .. '|' .. left)
return left
"""

# Fleet-wide proactive limit: GCRA with no burst (admitted events are at least `interval` ms
# apart, in Redis server time) plus a reservation line so that waiting messages get distinct
# future slots instead of all retrying at once. Returns {delay_ms, reserved}: delay 0 means
# "admitted, run now"; otherwise come back after delay_ms (reserved = 1 if a slot was taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local has_slot = tonumber(ARGV[2]) == 1
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local rtat = tonumber(redis.call('GET', KEYS[2]) or '0')
if now >= tat and (has_slot or now >= rtat) then
  redis.call('SET', KEYS[1], tostring(now + interval), 'PX', math.ceil(interval) + 60000)
  return {0, 0}
end
if has_slot then
  return {math.max(1, math.ceil(tat - now)), 1}
end
local slot = math.max(rtat, tat, now)
redis.call('SET', KEYS[2], tostring(slot + interval), 'PX', math.ceil(slot + interval - now) + 60000)
return {math.max(1, math.ceil(slot - now)), 1}
"""


def events_channel_for(client: Any) -> str:
    """The channel on which cooldowns of ``client``'s database are announced. Pub/Sub is one
    namespace for a whole Redis server, so with one channel for all, two applications on two
    databases of one server (say staging and production) whose cooldown keys had the same name
    held each other's workers back. Database 0 keeps the original channel (what every database
    used before), so existing deployments on it need no change; database N uses
    ``rpc_tasks:rate:events:N``. A cluster has database 0 only."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    try:
        db = int(kwargs.get("db") or 0)
    except (TypeError, ValueError):
        db = 0
    return RATE_EVENTS_CHANNEL if db == 0 else f"{RATE_EVENTS_CHANNEL}:{db}"


class RateStore:
    """Shared cooldowns and proactive rate limits in Redis (server time, so worker clocks
    do not matter). ``events_channel``: where cooldowns are announced, by default
    :func:`events_channel_for` the client's database."""

    def __init__(self, client: redis.Redis, events_channel: str | None = None) -> None:
        self.client = client
        self.events_channel = events_channel or events_channel_for(client)
        self._open = client.register_script(_OPEN_COOLDOWN)
        self._acquire = client.register_script(_ACQUIRE)
        self._view: dict[str, float] = {}
        self._checked: set[str] = set()
        self._view_ready = threading.Event()
        self._view_thread: threading.Thread | None = None
        self._view_pid = 0
        self._view_lock = threading.Lock()

    def open_cooldown(self, key: str, duration_ms: int, reason: str = "") -> int:
        """Open or extend the cooldown ``key`` to at least ``duration_ms``; returns ms left.
        Every process watching (:meth:`cooldown_left_fast`) learns of it over Pub/Sub."""
        try:
            return int(
                self._open(keys=[key], args=[max(1, int(duration_ms)), reason or "1", self.events_channel])
            )
        except RedisError as exc:
            raise RPCConnectionError(f"could not open a cooldown: {exc}") from exc

    # -- local view of open cooldowns --------------------------------------------------------

    def cooldown_left_fast(self, key: str) -> int:
        """Like :meth:`cooldown_left`, answered from a local view kept current over Pub/Sub
        (no round trip per message); falls back to ``PTTL`` while the view is not connected.
        A key not seen since the view connected is asked about once (``PTTL``): a cooldown
        opened before that was announced before this process listened."""
        self._ensure_view()
        if not self._view_ready.is_set():
            return self.cooldown_left(key)
        until = self._view.get(key)
        if until is None:
            if key in self._checked:
                return 0
            left = self.cooldown_left(key)
            if left > 0:  # into the view *before* the key counts as checked: another worker
                until = time.monotonic() + left / 1000.0  # thread may look in between
                if until > self._view.get(key, 0.0):
                    self._view[key] = until
            if len(self._checked) >= CHECKED_KEYS_LIMIT:
                self._checked = set()
            self._checked.add(key)
            return left
        left = int((until - time.monotonic()) * 1000)
        if left <= 0:
            self._view.pop(key, None)
            return 0
        return left

    def _ensure_view(self) -> None:
        if self._view_thread is not None and self._view_pid == os.getpid() and self._view_thread.is_alive():
            return
        with self._view_lock:
            if self._view_thread is None or self._view_pid != os.getpid() or not self._view_thread.is_alive():
                self._view_ready.clear()
                self._view_pid = os.getpid()
                self._view_thread = threading.Thread(target=self._watch, name="rpc-cooldowns", daemon=True)
                self._view_thread.start()

    def _watch(self) -> None:
        backoff = 0.1
        while True:
            pubsub: Any = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.events_channel)
                pubsub.get_message(timeout=1.0)  # the subscription is in place before "ready"
                # Nothing is scanned (a cluster node would only show its own keys): what was
                # opened before now is asked about per key on first use (see above).
                self._view, self._checked = {}, set()
                self._view_ready.set()
                backoff = 0.1
                # Wait in slices shorter than the client's socket timeout (if it has one).
                socket_timeout = _socket_timeout(self.client)
                wait = min(1.0, float(socket_timeout) / 2) if socket_timeout else 1.0
                next_prune = time.monotonic() + PRUNE_INTERVAL
                while True:
                    message = pubsub.get_message(timeout=wait)
                    if time.monotonic() >= next_prune:
                        self._prune_view()
                        next_prune = time.monotonic() + PRUNE_INTERVAL
                    if message is None or message.get("type") != "message":
                        continue
                    data = (
                        message["data"].decode()
                        if isinstance(message["data"], bytes)
                        else str(message["data"])
                    )
                    name, _, left_ms = data.rpartition("|")
                    until = time.monotonic() + int(left_ms) / 1000.0
                    if until > self._view.get(name, 0.0):
                        self._view[name] = until
            except (RedisError, ValueError, OSError):
                logger.warning("cooldown watcher lost Redis; asking Redis per message until it is back")
            finally:
                self._view_ready.clear()
                try:
                    pubsub.close()
                except Exception:  # pragma: no cover
                    pass
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _prune_view(self) -> None:
        """Drop ended cooldowns from the local view (keys used once, e.g. per tenant, would
        otherwise stay for good): one pass over the view per ``PRUNE_INTERVAL``."""
        now = time.monotonic()
        self._view = {name: until for name, until in list(self._view.items()) if until > now}

    def cooldown_left(self, key: str) -> int:
        """Milliseconds left on cooldown ``key`` (0 when none is open)."""
        try:
            left = int(self.client.pttl(key))
        except RedisError as exc:
            raise RPCConnectionError(f"could not read a cooldown: {exc}") from exc
        return left if left > 0 else 0

    def acquire(self, keys: tuple[str, str], interval_ms: float, has_slot: bool) -> tuple[int, bool]:
        """Ask the proactive limiter for permission: ``(0, False)`` = run now, else
        ``(delay_ms, reserved)``."""
        try:
            delay, reserved = self._acquire(keys=list(keys), args=[repr(float(interval_ms)), int(has_slot)])
        except RedisError as exc:
            raise RPCConnectionError(f"could not reach the rate limiter: {exc}") from exc
        return int(delay), bool(reserved)


def _socket_timeout(client: Any) -> float | None:
    """The client's ``socket_timeout`` (a plain client's pool, or a cluster client's option)."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        value = pool.connection_kwargs.get("socket_timeout")
    else:
        value = getattr(client, "nodes_manager", None) and client.nodes_manager.connection_kwargs.get(
            "socket_timeout"
        )
    return float(value) if value else None
