"""``RPCReplies``: the Dramatiq middleware that sends ``.call()`` results back to callers.

* ``before_process_message``: a ``.call()`` message whose caller's deadline has passed is
  skipped (not executed, no reply, logged, counted).
* ``after_process_message``: on success, push the success envelope to the reply key (with
  ``BlockingRedisBroker`` on the same Redis: in the same round trip as the message's ack).
* ``after_nack``: the message failed for good (retries exhausted, non-retryable error, bad
  params, an actor this worker does not know, a message that could not be decoded): push the
  structured error envelope (``method_not_found`` / ``invalid_request`` for the last two, which
  Dramatiq 2.x dead-letters before any worker thread sees them; Dramatiq issue #448). Nothing
  is pushed while Dramatiq will still retry.

``.send()`` messages carry no reply address and never get a reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, SkipMessage

from .. import context, metrics, protocol
from ..config import WebSocketRPCConfig, get_config
from ..encoder import OPTION_DECODE_ERROR, UNDECODABLE_ACTOR, redact_message_proxy
from ..exceptions import RPCException
from ..models.errors import RPCError, RPCErrorCode
from ..redis.replies import ReplyChannel
from . import order

logger = logging.getLogger(__name__)


def _undecodable_error(message: Any) -> RPCError:
    reason = message.options.get(OPTION_DECODE_ERROR, "invalid message")
    return RPCError(code=RPCErrorCode.INVALID_REQUEST, message=f"message cannot be processed: {reason}")


class RPCReplies(Middleware):
    """Reply path for ``@rpc_actor`` calls. Construct with no arguments to read the settings
    from Django's ``WEBSOCKET_RPC`` or the environment (see :func:`rpc_tasks.config.get_config`),
    which is what django-dramatiq's ``MIDDLEWARE`` setting does.

    Parameters:
      config: explicit settings (Redis URL, key prefix, TTL, default timeout, size limit).
      redis_client: an existing redis-py client for the replies (overrides ``config.redis_url``).
    """

    rpc_role = order.REPLIES

    def __init__(self, config: WebSocketRPCConfig | None = None, *, redis_client: Any = None) -> None:
        self._config = config
        self._redis_client = redis_client
        self._channel: ReplyChannel | None = None
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    # -- settings ------------------------------------------------------------------------------

    @property
    def config(self) -> WebSocketRPCConfig:
        """The effective settings (resolved on first use)."""
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._config = get_config()
        return self._config

    @property
    def channel(self) -> ReplyChannel:
        """The Redis reply channel (connection pool created on first use)."""
        if self._channel is None:
            config = self.config
            with self._lock:
                if self._channel is None:
                    self._channel = ReplyChannel.from_config(config, self._redis_client)
        return self._channel

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    # -- hooks ---------------------------------------------------------------------------------

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        for problem in order.check_broker(broker):
            logger.warning("rpc-tasks broker set-up: %s", problem)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not self.config.log_rpc_params:
            # Other brokers' consumers build proxies whose str() shows the params in Dramatiq's
            # "Failed to process message %s" line: hide them.
            redact_message_proxy(message)
        ctx = context.enter(message.message_id, message.actor_name, message)
        ctx.extra["pipe_target"] = message.options.get("pipe_target") is not None
        reply_to = message.options.get(protocol.OPTION_REPLY_TO)
        if reply_to is not None:
            deadline = message.options.get(protocol.OPTION_DEADLINE)
            if protocol.deadline_passed(deadline):
                self._count("expired_skipped")
                metrics.emit("expired_skipped", actor=message.actor_name, queue=message.queue_name)
                logger.warning(
                    "Skipping message %s of actor %r: its caller's deadline passed %.3fs ago.",
                    message.message_id,
                    message.actor_name,
                    time.time() - float(deadline),
                )
                context.leave()
                raise SkipMessage("caller deadline passed")

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        ctx = context.leave()
        if exception is not None and context.attached_error(message) is None:
            # Kept for after_nack (the reply of a message that failed for good); RPCRetries and
            # RPCRateLimits, which run earlier in this hook, attach a more precise one.
            context.attach_error(message, protocol.error_from_exception(exception))
        if exception is not None or message.failed:
            return
        reply_to = message.options.get(protocol.OPTION_REPLY_TO)
        if reply_to is None:
            return
        value = ctx.result if ctx is not None and ctx.has_result else result
        payload = protocol.encode_response(
            message.message_id, result=value, extended=True, max_bytes=self.config.max_payload_bytes
        )
        if not self._reply_address_ok(message, reply_to):
            return
        defer = getattr(broker, "defer_reply", None)
        channel = self.channel
        # BlockingRedisBroker pushes the reply together with the ack (same Redis: one round
        # trip less per call); otherwise push it now.
        if defer is not None and defer(message, reply_to, payload, channel.ttl, channel.client):
            self._count("replies_sent")
            return
        self._send(message, reply_to, payload, "replies_sent")

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        context.leave()

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.actor_name == UNDECODABLE_ACTOR:
            self._count("undecodable")
            logger.error(
                "Message %s cannot be processed (%s); dead-lettered.",
                message.message_id,
                message.options.get(OPTION_DECODE_ERROR),
            )
        elif message.actor_name not in broker.actors:
            self._count("unknown_actor")
            logger.error(
                "Message %s is for actor %r, which this worker does not know; dead-lettered.",
                message.message_id,
                message.actor_name,
            )
        reply_to = message.options.get(protocol.OPTION_REPLY_TO)
        if reply_to is None:
            return
        error: RPCError | None = context.attached_error(message)
        if error is None and message.actor_name == UNDECODABLE_ACTOR:
            error = _undecodable_error(message)
        if error is None and message.actor_name not in broker.actors:
            # Dramatiq's consumer thread nacks it (ActorNotFound) without running any
            # process_message hook: say so here.
            error = RPCError(
                code=RPCErrorCode.METHOD_NOT_FOUND, message=f"unknown actor: {message.actor_name!r}"
            )
        if error is None:
            error = RPCError(code=RPCErrorCode.INTERNAL_ERROR, message="message failed")
        attempts = message.options.get(protocol.OPTION_ATTEMPT)
        if isinstance(attempts, int) and "attempts" not in error.details:
            error = error.model_copy(update={"details": {**error.details, "attempts": attempts}})
        payload = protocol.encode_response(
            message.message_id, error=error, extended=True, max_bytes=self.config.max_payload_bytes
        )
        self._push(message, reply_to, payload, "error_replies_sent")

    # -- helpers -------------------------------------------------------------------------------

    def _reply_address_ok(self, message: Any, reply_to: Any) -> bool:
        prefix = self.channel.prefix
        if isinstance(reply_to, str) and protocol.is_reply_key(prefix, reply_to):
            return True
        self._count("bad_reply_to")
        logger.error(
            "Message %s has reply address %r outside the configured prefix %r; not replying. "
            "Callers and workers must share response_key_prefix.",
            message.message_id,
            reply_to,
            prefix,
        )
        return False

    def _push(self, message: Any, reply_to: Any, payload: bytes, counter: str) -> None:
        if self._reply_address_ok(message, reply_to):
            self._send(message, reply_to, payload, counter)

    def _send(self, message: Any, reply_to: str, payload: bytes, counter: str) -> None:
        channel = self.channel
        try:
            channel.push(reply_to, payload)
        except RPCException as exc:
            self._count("reply_push_failed")
            metrics.emit("reply_push_failed", actor=message.actor_name, queue=message.queue_name)
            logger.error(
                "Could not push the reply of message %s, nothing was written: %s", message.message_id, exc
            )
            return
        self._count(counter)
