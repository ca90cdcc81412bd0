"""``RPCRetries``: Dramatiq's ``Retries`` that knows which RPC errors are permanent.

A non-retryable :class:`~rpc_tasks.exceptions.RPCRemoteError` (for example a
``validation_error`` for bad params, or ``method_not_found``) fails the message at once, so a
``.call()`` caller gets the error immediately instead of after the retry schedule. Every other
exception is handed to Dramatiq's own ``Retries`` logic unchanged (``max_retries``,
``min_backoff``, ``max_backoff``, ``retry_when``, ``throws``, ``on_retry_exhausted``).
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware import Retries

from rpc_tasks.exceptions import RPCRemoteError

logger = logging.getLogger("rpc_tasks.retries")


def is_permanent(exception: BaseException) -> bool:
    """True for errors that retrying cannot fix."""
    if isinstance(exception, RPCRemoteError):
        return not exception.is_retryable
    return type(exception).__name__ == "ActorNotFound"


class RPCRetries(Retries):
    """Drop-in replacement for ``dramatiq.middleware.Retries`` (same options)."""

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
        if is_permanent(exception):
            logger.info(
                "Message %s of actor %r failed with a non-retryable error (%s); not retrying.",
                message.message_id,
                message.actor_name,
                exception,
            )
            message.fail()
            return
        super().after_process_message(  # type: ignore[no-untyped-call]
            broker, message, result=result, exception=exception
        )
