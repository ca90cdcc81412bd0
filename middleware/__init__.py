"""The design card's ``middleware`` package: the rpc-tasks Dramatiq middleware, re-exported.

The code lives in :mod:`rpc_tasks.middleware` (import it from there: a project with a module
of its own named ``middleware`` shadows this top-level package, and rpc-tasks itself never
imports it). ``middleware.RPCReplies`` is the same class as ``rpc_tasks.middleware.RPCReplies``.
"""

from rpc_tasks.middleware import (
    RPCRateLimits,
    RPCReplies,
    RPCRetries,
    check_broker,
    parse_rate,
    rate_limit_key,
    rpc_error_of,
)

__all__ = [
    "RPCRateLimits",
    "RPCReplies",
    "RPCRetries",
    "check_broker",
    "parse_rate",
    "rate_limit_key",
    "rpc_error_of",
]
