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
    message: Any = None
    has_result: bool = False
    result: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def enter(message_id: str, actor_name: str, message: Any = None) -> MessageContext:
    """Mark ``message_id`` as the message this thread is processing."""
    ctx = MessageContext(message_id=message_id, actor_name=actor_name, message=message)
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


def current_message() -> Any:
    """The Dramatiq message the calling worker thread is processing (``None`` outside one).

    Handy inside an ``@rpc_actor`` to read ``message.options["retries"]`` or the message id.
    """
    ctx = current()
    return None if ctx is None else ctx.message


_ERROR_ATTR = "_rpc_error"


def attach_error(message: Any, error: Any) -> None:
    """Remember the structured error a message failed with (sent to a ``.call()`` caller)."""
    setattr(message, _ERROR_ATTR, error)


def attached_error(message: Any) -> Any:
    """The error attached with :func:`attach_error`, if any."""
    return getattr(message, _ERROR_ATTR, None)
