"""Per-thread "message being processed" context shared by the actor and the middleware.

The reply middleware marks the message a worker thread is processing; ``RPCActor.__call__``
uses it to know it runs inside a worker (then the typed result is handed to the middleware
instead of being returned to Dramatiq, which would warn about an unused return value).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

_local = threading.local()


@dataclass
class MessageContext:
    """What the worker thread is doing right now."""

    message_id: str
    actor_name: str
    has_result: bool = False
    result: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def enter(message_id: str, actor_name: str) -> MessageContext:
    """Mark ``message_id`` as the message this thread is processing."""
    ctx = MessageContext(message_id=message_id, actor_name=actor_name)
    _local.ctx = ctx
    return ctx


def current() -> MessageContext | None:
    """The message context of this thread, if it is processing one."""
    return getattr(_local, "ctx", None)


def leave() -> MessageContext | None:
    """Clear (and return) this thread's message context."""
    ctx = getattr(_local, "ctx", None)
    _local.ctx = None
    return ctx
