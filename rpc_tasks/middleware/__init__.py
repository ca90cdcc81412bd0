"""Dramatiq middleware of rpc-tasks.

* :class:`RPCReplies` - pushes ``.call()`` results/errors back to the caller over Redis.
* :class:`RPCRateLimits` - shared cooldowns after rate-limit errors, proactive fleet-wide limits.
* :class:`RPCIdempotency` - idempotent actors run once, even when their message is redelivered.
* :class:`RPCRetries` - Dramatiq's ``Retries`` that honours ``retry_after``, fails non-retryable
  RPC errors at once and respects the caller's deadline.

:func:`check_broker` and :func:`middleware_paths` (in :mod:`.order`) say where they go.
"""

from .idempotency import RPCIdempotency
from .order import check_broker, middleware_paths
from .ratelimits import RPCRateLimits, parse_rate, rate_limit_key
from .replies import RPCReplies
from .retries import RPCRetries, rpc_error_of

__all__ = [
    "RPCIdempotency",
    "RPCRateLimits",
    "RPCReplies",
    "RPCRetries",
    "check_broker",
    "middleware_paths",
    "parse_rate",
    "rate_limit_key",
    "rpc_error_of",
]
