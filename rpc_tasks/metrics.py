"""A tiny metrics hook: rpc-tasks middleware reports events here; plug in Prometheus,
StatsD or logs with :func:`add_listener`.

Events (``labels`` always include ``actor``):

* ``retry`` (``code``, ``delay_ms``, ``attempt``): a failed attempt was scheduled again;
* ``postpone`` (``reason``: ``cooldown`` | ``rate_limit``, ``delay_ms``): a message was put back
  without running and without using a retry;
* ``cooldown_opened`` (``key``, ``duration_ms``): a rate-limit error opened a shared cooldown;
* ``gave_up`` (``reason``: ``deadline`` | ``postpone_cap`` | ``retries_exhausted`` |
  ``non_retryable``): the message failed for good;
* ``expired_skipped``: a ``.call()`` message arrived after its caller's deadline.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("rpc_tasks.metrics")

Listener = Callable[[str, Mapping[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
#: In-process totals, keyed by ``(event, actor)``.
counters: Counter[tuple[str, str]] = Counter()


def add_listener(listener: Listener) -> None:
    """Call ``listener(event, labels)`` for every event (must be fast and thread-safe)."""
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``."""
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def emit(event: str, **labels: Any) -> None:
    """Record ``event`` and pass it to every listener (listener errors are logged, not raised)."""
    actor = str(labels.get("actor", ""))
    with _lock:
        counters[(event, actor)] += 1
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event, labels)
        except Exception:
            logger.exception("metrics listener %r failed", listener)
