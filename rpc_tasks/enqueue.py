"""Enqueueing that rides out a short broker outage (``.send()``, retries, postponements)."""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
from dramatiq.errors import ConnectionClosed, ConnectionFailed
from redis.exceptions import RedisError

from .exceptions import RPCConnectionError

logger = logging.getLogger(__name__)

#: What a failed enqueue raises (Dramatiq's connection errors have these two public names in
#: every 2.x release; their base class was renamed in 2.1).
ENQUEUE_ERRORS = (ConnectionClosed, ConnectionFailed, RedisError, OSError)


def enqueue_retrying(
    broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None, retry_for: float
) -> dramatiq.Message[Any]:
    """Enqueue ``message``; while the broker is unreachable, try again (pauses of up to 0.5 s)
    for up to ``retry_for`` seconds, then raise ``RPCConnectionError``. A retried enqueue keeps
    its message id: in the rare case where the first attempt went in but its answer was lost,
    the message is there twice with one id (``idempotent`` actors run it once)."""
    give_up = time.monotonic() + retry_for
    pause = 0.05
    while True:
        try:
            return broker.enqueue(message, delay=delay)
        except ENQUEUE_ERRORS as exc:
            left = give_up - time.monotonic()
            if left <= 0:
                raise RPCConnectionError(f"could not enqueue {message.actor_name!r}: {exc}") from exc
            if pause == 0.05:
                logger.warning(
                    "Enqueue of %r failed (%s); retrying for %.1fs.", message.actor_name, exc, left
                )
            time.sleep(min(pause, left))
            pause = min(0.5, pause * 2)
