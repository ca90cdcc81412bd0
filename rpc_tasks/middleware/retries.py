"""``RPCRetries``: Dramatiq's ``Retries``, made RPC-aware.

It replaces ``dramatiq.middleware.Retries`` (same options: ``max_retries``, ``min_backoff``,
``max_backoff``, ``retry_when``, ``throws``, ``on_retry_exhausted``, per actor and per message)
and adds:

* **retry_after is honoured**: a retryable error with ``retry_after = r`` is retried after
  ``max(r, backoff) + jitter`` where ``backoff = min(min_backoff * 2**retries, max_backoff)``
  and the jitter only ever *adds* (up to ``jitter`` x that delay, 10 % by default); nothing is
  retried earlier than ``r``.
* **non-retryable errors fail at once**: an ``RPCRemoteError`` whose error is not retryable
  (by default every code except ``timeout``, ``service_unavailable`` and
  ``rate_limit_exceeded``; override with the ``retry_codes`` option) is not retried.
* **deadline-aware**: for a ``.call()`` message, a retry that would start after the caller's
  deadline is not scheduled; the caller gets the last error (with its ``retry_after``) now.
  ``.send()`` messages have no caller and keep retrying up to their limits.
* **observable**: one log line per retry/give-up (actor, message id, attempt, code, delay) and
  :mod:`rpc_tasks.metrics` events.

Exceptions that are not RPC errors keep Dramatiq's meaning: they are retried up to
``max_retries`` (with the backoff above).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.errors import Retry
from dramatiq.middleware import Retries
from pydantic import ValidationError

from .. import context, metrics, protocol
from ..enqueue import enqueue_retrying
from ..exceptions import RPCException
from ..models.errors import RPCError, RPCErrorCode
from . import order

logger = logging.getLogger(__name__)

#: How long re-enqueueing a retry (or a postponed message) is retried while the broker is down.
REENQUEUE_RETRY_SECONDS = 30.0
#: Dramatiq refuses delays of 7 days or more.
MAX_DELAY_MS = 7 * 24 * 3600 * 1000 - 1


def rpc_error_of(exception: BaseException) -> RPCError | None:
    """The structured error of an RPC exception (``None`` for ordinary exceptions)."""
    if isinstance(exception, (RPCException, ValidationError)):
        return protocol.error_from_exception(exception)
    return None


class RPCRetries(Retries):
    """Drop-in replacement for ``dramatiq.middleware.Retries`` (see the module docstring).

    Parameters (besides Dramatiq's):
      jitter: the random extra delay, as a fraction of the delay (only ever added).
      retry_codes: error codes to retry; when given, it decides instead of each error's own
        ``retryable`` flag. Also an actor/message option.
    """

    rpc_role = order.RETRIES

    def __init__(
        self,
        *,
        max_retries: int = 20,
        min_backoff: int | None = None,
        max_backoff: int | None = None,
        retry_when: Any = None,
        jitter: float = 0.1,
        retry_codes: Iterable[str | RPCErrorCode] | None = None,
    ) -> None:
        super().__init__(
            max_retries=max_retries, min_backoff=min_backoff, max_backoff=max_backoff, retry_when=retry_when
        )
        self.jitter = jitter
        self.retry_codes = None if retry_codes is None else frozenset(_code(c) for c in retry_codes)

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"retry_codes", "jitter"}

    # -- policy ------------------------------------------------------------------------------

    def _option(self, message: Any, actor: Any, name: str, default: Any) -> Any:
        if name in message.options:
            return message.options[name]
        if actor is not None and name in actor.options:
            return actor.options[name]
        return default

    def is_retryable(self, message: Any, actor: Any, error: RPCError) -> bool:
        """Whether an RPC error should be retried (``retry_codes`` option, else its flag)."""
        codes = self._option(message, actor, "retry_codes", self.retry_codes)
        if codes is not None:
            allowed = {_code(c) for c in codes}
            return _code(error.wire_code) in allowed or error.code.value in allowed
        return error.retryable

    def compute_delay_ms(self, message: Any, actor: Any, retries: int, retry_after: float | None) -> int:
        """``max(retry_after, backoff) + jitter`` in ms, where the jitter only adds."""
        min_backoff = int(self._option(message, actor, "min_backoff", self.min_backoff))
        max_backoff = int(self._option(message, actor, "max_backoff", self.max_backoff))
        jitter = float(self._option(message, actor, "jitter", self.jitter))
        backoff: int = min(max_backoff, min_backoff * (2 ** min(retries, 32)))
        base = max(backoff, 0 if retry_after is None else int(retry_after * 1000 + 0.999))
        return min(MAX_DELAY_MS, base + int(random.uniform(0.0, max(0.0, jitter) * base)))

    # -- hook --------------------------------------------------------------------------------

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or message.failed:
            return
        actor = broker.actors.get(message.actor_name)
        attempt: int = int(message.options.get(protocol.OPTION_ATTEMPT, 0) or 0)
        if actor is None:
            self._give_up(message, "non_retryable", "method_not_found", attempt)
            return
        throws = message.options.get("throws") or actor.options.get("throws")
        if throws and isinstance(exception, throws):
            self._give_up(message, "non_retryable", type(exception).__name__, attempt)
            return
        error = rpc_error_of(exception)
        retry_after: float | None = None
        if isinstance(exception, Retry) and exception.delay is not None:
            retry_after = exception.delay / 1000.0
        code = type(exception).__name__
        if error is not None:
            code = error.wire_code
            retry_after = error.retry_after
            if not self.is_retryable(message, actor, error):
                self._give_up(message, "non_retryable", code, attempt)
                return

        retries: int = int(message.options.setdefault("retries", 0) or 0)
        max_retries = self._option(message, actor, "max_retries", self.max_retries)
        retry_when = actor.options.get("retry_when", self.retry_when)
        exhausted = (
            not retry_when(retries, exception)
            if retry_when is not None
            else max_retries is not None and retries >= max_retries
        )
        message.options["retries"] = retries + 1
        message.options["traceback"] = traceback.format_exc(limit=30)
        message.options["requeue_timestamp"] = int(time.time() * 1000)
        if exhausted:
            self._give_up(message, "retries_exhausted", code, attempt)
            target = message.options.get("on_retry_exhausted") or actor.options.get("on_retry_exhausted")
            if target:
                broker.get_actor(target).send(
                    message.asdict(), {"retries": retries, "max_retries": max_retries}
                )
            return

        delay = self.compute_delay_ms(message, actor, retries, retry_after)
        deadline = message.options.get(protocol.OPTION_DEADLINE)
        if (
            message.options.get(protocol.OPTION_REPLY_TO)
            and isinstance(deadline, (int, float))
            and time.time() + delay / 1000.0 > deadline
        ):
            if error is not None:
                details = {**error.details, "next_retry_in": round(delay / 1000.0, 3)}
                context.attach_error(message, error.model_copy(update={"details": details}))
            self._give_up(message, "deadline", code, attempt, delay)
            return
        logger.info(
            "Retry: actor=%s message=%s attempt=%d code=%s delay_ms=%d",
            message.actor_name,
            message.message_id,
            attempt,
            code,
            delay,
        )
        metrics.emit("retry", actor=message.actor_name, code=code, delay_ms=delay, attempt=attempt)
        try:
            # Redis briefly down: retried here; a retry that cannot be scheduled at all is
            # dead-lettered (visible) rather than acked as if it had succeeded.
            enqueue_retrying(broker, message, delay, REENQUEUE_RETRY_SECONDS)
        except RPCException as exc:
            logger.error(
                "Could not schedule the retry of message %s (%s); dead-lettered.", message.message_id, exc
            )
            message.fail()

    def _give_up(self, message: Any, reason: str, code: str, attempt: int, delay: int | None = None) -> None:
        message.fail()
        metrics.emit("gave_up", actor=message.actor_name, reason=reason, code=code)
        extra = f" (next retry would be in {delay} ms, after the caller's deadline)" if delay else ""
        logger.info(
            "Gave up: actor=%s message=%s attempt=%d code=%s reason=%s%s",
            message.actor_name,
            message.message_id,
            attempt,
            code,
            reason,
            extra,
        )


def _code(value: str | RPCErrorCode) -> str:
    return value.value if isinstance(value, RPCErrorCode) else str(value).lower()
