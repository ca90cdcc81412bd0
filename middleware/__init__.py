"""Dramatiq middleware of rpc-tasks.

* :class:`RPCReplies` - pushes ``.call()`` results/errors back to the caller over Redis.
* :class:`RPCRetries` - Dramatiq's ``Retries`` that fails non-retryable RPC errors at once.
"""

from .replies import RPCReplies
from .retries import RPCRetries, is_permanent

__all__ = ["RPCReplies", "RPCRetries", "is_permanent"]
