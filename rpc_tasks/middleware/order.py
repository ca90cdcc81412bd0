"""The order rpc-tasks' middleware must have on a broker, and a checker for hand-made set-ups.

* ``RPCReplies`` first, so that expired ``.call()`` messages are skipped and unknown actors are
  failed before any other middleware does work for them;
* ``RPCRateLimits`` right after it, so a message for a cooling-down key is put back before
  anything else runs;
* ``RPCIdempotency`` after those two, so a message that is skipped or postponed never takes
  an idempotency lock, and before Dramatiq's own middleware;
* ``RPCRetries`` *instead of* ``dramatiq.middleware.Retries`` (same options), so non-retryable
  RPC errors fail at once.

Each of the four classes names its role in a ``rpc_role`` class attribute; the checker goes by
that role, so this module imports none of them (the reply middleware runs the checker when a
worker boots).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Retries

REPLIES = "replies"
RATE_LIMITS = "rate_limits"
RETRIES = "retries"
IDEMPOTENCY = "idempotency"

#: Dotted paths of rpc-tasks middleware, for django-dramatiq's ``MIDDLEWARE`` setting.
REPLIES_PATH = "rpc_tasks.middleware.RPCReplies"
RATE_LIMITS_PATH = "rpc_tasks.middleware.RPCRateLimits"
RETRIES_PATH = "rpc_tasks.middleware.RPCRetries"
IDEMPOTENCY_PATH = "rpc_tasks.middleware.RPCIdempotency"

#: Dramatiq 2.x's default middleware, minus ``Retries`` (replaced by ``RPCRetries``).
#: ``dramatiq.middleware.Prometheus`` is deliberately absent: it does not import under 2.x.
DRAMATIQ_DEFAULTS = [
    "dramatiq.middleware.AgeLimit",
    "dramatiq.middleware.TimeLimit",
    "dramatiq.middleware.ShutdownNotifications",
    "dramatiq.middleware.Callbacks",
    "dramatiq.middleware.Pipelines",
]


#: Dramatiq's event loop thread for ``async def`` actors (see ``install_asyncio``).
ASYNCIO_PATH = "dramatiq.middleware.asyncio.AsyncIO"


def middleware_paths(extra: list[str] | None = None) -> list[str]:
    """Full middleware list (dotted paths) in the right order, e.g. for django-dramatiq::

    DRAMATIQ_BROKER = {
        "BROKER": "rpc_tasks.redis.broker.BlockingRedisBroker",
        "OPTIONS": {"url": "redis://localhost:6379/0"},
        "MIDDLEWARE": rpc_tasks.middleware_paths(),
    }
    """
    return [
        REPLIES_PATH,
        RATE_LIMITS_PATH,
        IDEMPOTENCY_PATH,
        *DRAMATIQ_DEFAULTS,
        RETRIES_PATH,
        ASYNCIO_PATH,
        *(extra or []),
    ]


def role_of(middleware: Any) -> str | None:
    """The rpc-tasks role of a middleware instance (``None`` for any other middleware)."""
    role = getattr(type(middleware), "rpc_role", None)
    return role if isinstance(role, str) else None


def check_broker(broker: dramatiq.Broker) -> list[str]:
    """Problems with a broker's rpc-tasks set-up, as human-readable strings (empty if fine)."""
    problems: list[str] = []
    roles = [role_of(m) for m in broker.middleware]
    if REPLIES not in roles:
        problems.append("RPCReplies middleware is missing: .call() would never get a reply")
    elif roles.index(REPLIES) != 0:
        problems.append("RPCReplies should be the first middleware (it skips expired calls early)")
    if RATE_LIMITS not in roles:
        problems.append("RPCRateLimits middleware is missing: rate-limit errors will not cool the fleet down")
    elif REPLIES in roles and roles.index(RATE_LIMITS) < roles.index(REPLIES):
        problems.append("RPCRateLimits must come after RPCReplies")
    # RPCIdempotency is optional (without it, declaring an idempotent actor fails at once).
    if IDEMPOTENCY in roles and RATE_LIMITS in roles and roles.index(IDEMPOTENCY) < roles.index(RATE_LIMITS):
        problems.append(
            "RPCIdempotency must come after RPCRateLimits (a postponed message must not take its lock)"
        )
    if any(type(m) is Retries for m in broker.middleware):
        problems.append(
            "dramatiq.middleware.Retries is installed: replace it with rpc_tasks.middleware.RPCRetries "
            "(same options) so non-retryable errors fail at once"
        )
    if RETRIES not in roles:
        problems.append("RPCRetries middleware is missing")
    elif roles.count(RETRIES) > 1:
        problems.append("RPCRetries is installed more than once")
    return problems
