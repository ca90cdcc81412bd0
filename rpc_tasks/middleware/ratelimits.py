"""``RPCRateLimits``: rate-limit-aware scheduling shared by every worker of the fleet.

Shared cooldowns
    When an actor fails with ``rate_limit_exceeded`` (``RateLimitError``), a cooldown for its
    *rate-limit key* opens in Redis until ``now + retry_after`` (``default_cooldown`` when the
    error has no ``retry_after``). While it is open, every worker that picks up a message for
    that key puts it back, **without running it**, to the end of the cooldown plus a random
    spread (so the fleet does not stampede the remote when the cooldown ends). These
    postponements do not use ``max_retries``; ``max_postpone`` (seconds, total per message)
    caps them, and a message over the cap is dead-lettered with the reason.

Proactive limit
    ``@rpc_actor(rate_limit="50/s")`` (also ``/m``, ``/h``) holds the whole fleet under that
    rate for the key: a message that would exceed it is postponed to a reserved slot instead
    of failing. Admission uses Redis server time (worker clocks do not matter) and keeps
    admitted messages at least ``1/rate`` (plus a 2 % safety margin) apart, so no window of the
    period ever sees more than the rate.

Rate-limit key
    The actor name by default; an actor may declare ``rate_limit_key="tenant-api"`` or a
    callable taking the params model (``rate_limit_key=lambda p: f"tenant:{p.tenant_id}"``).

Deadlines
    A ``.call()`` message that would have to wait past its caller's deadline fails at once and
    the caller gets a ``rate_limit_exceeded`` error whose ``retry_after`` says how long.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, SkipMessage

from .. import context, metrics, protocol
from ..config import WebSocketRPCConfig, get_config
from ..enqueue import enqueue_retrying
from ..exceptions import RPCConfigurationError, RPCException
from ..models.errors import RateLimitError, RPCErrorCode
from ..redis.connection import client_from_config
from ..redis.ratestore import RateStore, cooldown_key, limiter_keys
from . import order
from .retries import REENQUEUE_RETRY_SECONDS

logger = logging.getLogger(__name__)

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.I)
_UNIT_SECONDS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}

#: Longest delay Dramatiq accepts for a message (7 days), in ms.
MAX_DELAY_MS = 7 * 24 * 3600 * 1000 - 1


def parse_rate(rate: str) -> tuple[float, float]:
    """Parse ``"50/s"``, ``"600/m"``, ``"1000/h"`` or ``"5/10s"`` into ``(count, seconds)``."""
    match = _RATE_RE.match(rate) if isinstance(rate, str) else None
    if match is None:
        raise RPCConfigurationError(f"rate_limit must look like '50/s', '600/m' or '5/10s', not {rate!r}")
    count = float(match.group(1))
    per = float(match.group(2) or 1) * _UNIT_SECONDS[match.group(3).lower()]
    if count <= 0 or per <= 0:
        raise RPCConfigurationError(f"rate_limit must be positive: {rate!r}")
    return count, per


def rate_limit_key(actor: Any, message: Any) -> str:
    """The rate-limit key of ``message`` (see the module docstring)."""
    declared = actor.options.get("rate_limit_key") if actor is not None else None
    if declared is None:
        return str(message.actor_name)
    if callable(declared):
        try:
            params = (
                actor.validate_params(message.args[0])
                if hasattr(actor, "validate_params")
                else (message.args[0] if message.args else None)
            )
            return str(declared(params))
        except Exception:
            logger.warning(
                "rate_limit_key of %r failed; using the actor name", message.actor_name, exc_info=True
            )
            return str(message.actor_name)
    return str(declared)


class RPCRateLimits(Middleware):
    """Shared cooldowns and proactive rate limits (see the module docstring).

    Parameters:
      config: settings (Redis URL); default: the broker's ``RPCReplies`` settings / environment.
      max_postpone: seconds a message may be postponed in total before it is dead-lettered.
      default_cooldown: seconds a rate-limit error without ``retry_after`` cools the key down.
      spread: fraction of the wait added at random to postponed messages (at least 50 ms).
      safety_margin: extra spacing of the proactive limiter (0.02 = 2 %).
      max_inline_wait: a worker thread waits in place for a proactive-limit slot this close
        (seconds); farther slots are reached by postponing the message.
    """

    rpc_role = order.RATE_LIMITS

    def __init__(
        self,
        config: WebSocketRPCConfig | None = None,
        *,
        redis_client: Any = None,
        max_postpone: float = 3600.0,
        default_cooldown: float = 1.0,
        spread: float = 0.25,
        safety_margin: float = 0.02,
        max_inline_wait: float = 0.25,
    ) -> None:
        self._config = config
        self._redis_client = redis_client
        self._store: RateStore | None = None
        self._lock = threading.Lock()
        self.max_postpone = max_postpone
        self.default_cooldown = default_cooldown
        self.spread = spread
        self.safety_margin = safety_margin
        self.max_inline_wait = max_inline_wait
        self._rates: dict[str, tuple[float, float] | None] = {}

    @property
    def actor_options(self) -> set[str]:
        return {"rate_limit", "rate_limit_key", "max_postpone"}

    # -- state -------------------------------------------------------------------------------

    def store(self, broker: dramatiq.Broker) -> RateStore:
        """The Redis store (shares the reply middleware's connection pool when there is one)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    client = self._redis_client
                    if client is None:
                        replies: Any = next(
                            (m for m in broker.middleware if order.role_of(m) == order.REPLIES), None
                        )
                        if replies is not None and self._config is None:
                            client = replies.channel.client
                        else:
                            client = client_from_config(self._config or get_config())
                    self._store = RateStore(client)
        return self._store

    def _rate(self, actor: Any) -> tuple[float, float] | None:
        name = actor.actor_name
        if name not in self._rates:
            rate = actor.options.get("rate_limit")
            self._rates[name] = parse_rate(rate) if rate is not None else None
        return self._rates[name]

    # -- hooks -------------------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.failed:
            return
        actor = broker.actors.get(message.actor_name)
        if actor is None:
            return
        key = rate_limit_key(actor, message)
        store = self.store(broker)
        try:
            left = store.cooldown_left_fast(cooldown_key(key))
            if left > 0:
                jitter = random.uniform(0, max(50.0, left * self.spread))
                self._postpone(broker, message, actor, key, int(left + jitter), "cooldown", slot=False)
                return
            rate = self._rate(actor)
            if rate is not None:
                count, per = rate
                interval_ms = per * 1000.0 / count * (1.0 + self.safety_margin)
                has_slot = message.options.get(protocol.OPTION_RATE_SLOT) == 1
                inline_until = time.monotonic() + self.max_inline_wait
                while True:
                    delay, reserved = store.acquire(limiter_keys(key), interval_ms, has_slot)
                    if delay <= 0:
                        break
                    has_slot = has_slot or reserved
                    if time.monotonic() + delay / 1000.0 > inline_until:
                        self._postpone(broker, message, actor, key, delay, "rate_limit", slot=has_slot)
                        return
                    time.sleep(delay / 1000.0)  # a short wait for our slot: cheaper than a round trip
                message.options.pop(protocol.OPTION_RATE_SLOT, None)
        except RPCException:
            # Redis for rate state is down: run the message rather than stall the fleet.
            logger.warning(
                "rate-limit state unavailable; running %s unthrottled", message.message_id, exc_info=True
            )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        error = protocol.error_from_exception(exception)
        if error.code is not RPCErrorCode.RATE_LIMIT_EXCEEDED:
            return
        actor = broker.actors.get(message.actor_name)
        key = rate_limit_key(actor, message)
        seconds = error.retry_after if error.retry_after is not None else self.default_cooldown
        duration_ms = max(1, int(seconds * 1000))
        try:
            self.store(broker).open_cooldown(cooldown_key(key), duration_ms, message.message_id)
        except RPCException:
            logger.warning("could not open the cooldown for %r", key, exc_info=True)
            return
        metrics.emit("cooldown_opened", actor=message.actor_name, key=key, duration_ms=duration_ms)
        logger.info(
            "Cooldown opened: actor=%s message=%s key=%s duration_ms=%d",
            message.actor_name,
            message.message_id,
            key,
            duration_ms,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _postpone(
        self,
        broker: dramatiq.Broker,
        message: Any,
        actor: Any,
        key: str,
        delay_ms: int,
        reason: str,
        *,
        slot: bool,
    ) -> None:
        delay_ms = min(max(1, delay_ms), MAX_DELAY_MS)
        postponed = int(message.options.get(protocol.OPTION_POSTPONED_MS, 0) or 0) + delay_ms
        cap = message.options.get("max_postpone", actor.options.get("max_postpone", self.max_postpone))
        attempt = int(message.options.get(protocol.OPTION_ATTEMPT, 0) or 0)
        deadline = message.options.get(protocol.OPTION_DEADLINE)
        if (
            message.options.get(protocol.OPTION_REPLY_TO)
            and isinstance(deadline, (int, float))
            and (time.time() + delay_ms / 1000.0 > deadline)
        ):
            self._give_up(
                message,
                "deadline",
                RateLimitError(
                    message=f"rate-limit key {key!r} is throttled ({reason}) past the caller's deadline",
                    retry_after=round(delay_ms / 1000.0, 3),
                    details={"rate_limit_key": key, "reason": reason},
                ),
            )
            return
        if cap is not None and postponed > float(cap) * 1000.0:
            self._give_up(
                message,
                "postpone_cap",
                RateLimitError(
                    message=(
                        f"postponed {postponed / 1000.0:.1f}s in total for rate-limit key {key!r} "
                        f"({reason}), over max_postpone={float(cap):g}s; dead-lettered"
                    ),
                    retryable=False,
                    retry_after=round(delay_ms / 1000.0, 3),
                    details={"rate_limit_key": key, "reason": reason, "postponed_ms": postponed},
                ),
            )
            return
        options = {**message.options, protocol.OPTION_POSTPONED_MS: postponed}
        if slot:
            options[protocol.OPTION_RATE_SLOT] = 1
        options.pop("eta", None)
        try:
            enqueue_retrying(broker, message.copy(options=options), delay_ms, REENQUEUE_RETRY_SECONDS)
        except RPCException as exc:
            logger.error("Could not postpone message %s (%s); dead-lettered.", message.message_id, exc)
            message.fail()
        metrics.emit("postpone", actor=message.actor_name, reason=reason, delay_ms=delay_ms, key=key)
        logger.info(
            "Postponed: actor=%s message=%s attempt=%d reason=%s key=%s delay_ms=%d (retries not used)",
            message.actor_name,
            message.message_id,
            attempt,
            reason,
            key,
            delay_ms,
        )
        raise SkipMessage(f"postponed ({reason})")

    def _give_up(self, message: Any, why: str, error: RateLimitError) -> None:
        context.attach_error(message, error)
        message.fail()
        metrics.emit("gave_up", actor=message.actor_name, reason=why)
        log = logger.error if why == "postpone_cap" else logger.info
        log(
            "Gave up: actor=%s message=%s reason=%s: %s",
            message.actor_name,
            message.message_id,
            why,
            error.message,
        )
