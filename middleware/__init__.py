"""Dramatiq middleware of rpc-tasks.

* :class:`RPCReplies` - pushes ``.call()`` results/errors back to the caller over Redis.
* :class:`RPCRateLimits` - shared cooldowns after rate-limit errors, proactive fleet-wide limits.
* :class:`RPCRetries` - Dramatiq's ``Retries`` that honours ``retry_after``, fails non-retryable
  RPC errors at once and respects the caller's deadline.
"""

from .ratelimits import RPCRateLimits, parse_rate, rate_limit_key
from .replies import RPCReplies
from .retries import RPCRetries, rpc_error_of

__all__ = [
    "RPCRateLimits",
    "RPCReplies",
    "RPCRetries",
    "parse_rate",
    "rate_limit_key",
    "rpc_error_of",
]
