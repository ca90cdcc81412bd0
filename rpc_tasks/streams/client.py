"""``WebSocketRPCClient``: synchronous RPC to a WebSocket server over Redis.

Requests go on a Redis Stream read by a consumer group, replies come back on a Redis list
(``BLPOP``), broadcasts use Pub/Sub. The wire format is in :mod:`rpc_tasks.protocol` and
every Redis call in :mod:`rpc_tasks.streams.io` (replies: :mod:`rpc_tasks.redis.replies`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, TypeVar

import redis
from pydantic import BaseModel

from .. import metrics, protocol
from ..config import WebSocketRPCConfig, get_config
from ..exceptions import RPCException, RPCRemoteError, RPCTimeoutError
from ..models.base import new_correlation_id
from ..models.errors import RPCError, RPCErrorCode
from ..redis.connection import client_from_config
from ..redis.replies import ReplyChannel
from .builtins import (
    PING_METHOD,
    SYSTEM_PING_METHOD,
    PingParams,
    PingResult,
    SystemPingParams,
    SystemPingResult,
)
from .io import StreamIO

logger = logging.getLogger(__name__)

TResult = TypeVar("TResult", bound=BaseModel)


class WebSocketRPCClient:
    """Thread-safe RPC client (one instance per process is enough; see :func:`get_rpc_client`).

    Parameters:
      config: settings; default :func:`rpc_tasks.config.get_config`.
      redis_client: an existing redis-py client (default: a blocking pool of
        ``redis_max_connections`` connections; callers beyond that wait up to
        ``redis_pool_timeout`` seconds for one).
    """

    def __init__(self, config: WebSocketRPCConfig | None = None, *, redis_client: Any = None) -> None:
        self.config = config or get_config()
        self._owns_redis = redis_client is None
        self.redis = redis_client or client_from_config(self.config)
        self.replies = ReplyChannel.from_config(self.config, self.redis)
        self.streams = StreamIO(self.redis, reply_ttl=self.config.response_key_ttl)
        self._extensions = (
            frozenset({protocol.ERROR_DETAILS_EXTENSION}) if self.config.announce_extensions else frozenset()
        )
        logger.setLevel(self.config.log_level_int)

    def __repr__(self) -> str:
        return f"WebSocketRPCClient(redis_url={self.config.redacted()['redis_url']!r})"

    # -- calls ---------------------------------------------------------------------------------

    @metrics.observed("stream_call", lambda client, method, *_, **__: {"actor": method})
    def call(
        self,
        method: str,
        params: BaseModel,
        result_model: type[TResult],
        timeout: float | None = None,
    ) -> TResult:
        """Call ``method`` and wait for its result, validated into ``result_model``.

        ``timeout`` is in seconds (float, millisecond precision; default ``rpc_timeout``).
        Raises :class:`RPCTimeoutError`, :class:`RPCRemoteError` (code, retryable,
        retry_after), ``pydantic.ValidationError`` (the result does not match
        ``result_model``) or :class:`RPCConnectionError` (any Redis failure).
        """
        timeout = protocol.check_timeout(timeout, self.config.rpc_timeout)
        if timeout > protocol.MAX_REQUEST_TIMEOUT:
            raise ValueError(f"timeout must be at most {protocol.MAX_REQUEST_TIMEOUT} s")
        started = time.monotonic()
        correlation_id = new_correlation_id()
        reply_to = self.replies.key_for(correlation_id)
        payload = protocol.encode_request(
            method,
            params,
            reply_to=reply_to,
            timeout=protocol.wire_timeout(timeout),
            correlation_id=correlation_id,
            extensions=self._extensions,
            max_bytes=self.config.max_payload_bytes,
            trace_context=metrics.trace_context() if self._extensions else None,
        )
        outcome = "error"
        try:
            # XADD and the reply's BLPOP go out in one write: one round trip for the caller.
            request = self.streams.request_command(
                self.config.request_stream, payload, self.config.stream_maxlen
            )
            try:
                raw = self.replies.wait(reply_to, timeout - (time.monotonic() - started), first=request)
            except redis.ResponseError as exc:
                raise self.streams.failed("XADD", exc) from exc
            if raw is None:
                outcome = "timeout"
                raise RPCTimeoutError(method, timeout)
            response = protocol.decode_response(raw, max_bytes=self.config.max_payload_bytes)
            if not response.success:
                error = response.error or RPCError(message="remote call failed")
                outcome = f"remote_error:{error.wire_code}"
                raise RPCRemoteError(error)
            result = result_model.model_validate(response.result)
            outcome = "ok"
            return result
        finally:
            self._log(method, correlation_id, started, outcome, params)

    @metrics.observed("stream_send", lambda client, method, *_, **__: {"actor": method})
    def fire_and_forget(self, method: str, params: BaseModel) -> str:
        """Send a request nobody waits for (``timeout = 0``: the server sends no reply).
        Returns the Redis Stream entry id. With tracing on, a client that announces extensions
        sends its trace context along (the request then lists its extensions too)."""
        started = time.monotonic()
        correlation_id = new_correlation_id()
        trace = metrics.trace_context() if self._extensions else None
        payload = protocol.encode_request(
            method,
            params,
            reply_to=self.replies.key_for(correlation_id),
            timeout=0,
            correlation_id=correlation_id,
            extensions=self._extensions if trace else (),
            max_bytes=self.config.max_payload_bytes,
            trace_context=trace,
        )
        outcome = "error"
        try:
            entry_id = self.streams.add_request(
                self.config.request_stream, payload, self.config.stream_maxlen
            )
            outcome = "sent"
            return entry_id
        finally:
            self._log(method, correlation_id, started, outcome, params)

    def broadcast(self, channel: str, message: BaseModel) -> int:
        """Publish ``message`` (JSON) on a Pub/Sub channel; returns how many subscribers got it."""
        if not channel or not isinstance(channel, str):
            raise ValueError("channel must be a non-empty string")
        data = protocol.dumps(
            protocol.model_to_wire(message), max_bytes=self.config.max_payload_bytes, what="broadcast"
        )
        count = self.streams.publish(channel, data)
        if self.config.log_rpc_calls:
            logger.info("rpc broadcast channel=%s subscribers=%d", channel, count)
        return count

    def health_check(self, timeout: float = 5) -> bool:
        """True when a server answers a ping within ``timeout`` seconds. Never raises.

        Asks ``ping`` first; a server that answers it does not know that method (django-ipc,
        whose ping is ``system.ping``) is asked ``system.ping`` in the time that is left, so the
        check never waits longer than ``timeout``. A ping that gets no answer is not retried.
        """
        deadline = time.monotonic() + timeout
        try:
            try:
                result = self.call(PING_METHOD, PingParams(), PingResult, timeout=timeout)
                return bool(result.pong)
            except RPCRemoteError as exc:
                left = deadline - time.monotonic()
                if not _unknown_method(exc) or left <= 0:
                    raise
            self.call(SYSTEM_PING_METHOD, SystemPingParams(), SystemPingResult, timeout=left)
            return True
        except (RPCException, ValueError) as exc:
            logger.debug("health check failed: %s", exc)
            return False
        except Exception:  # never raise from a health check
            logger.debug("health check failed", exc_info=True)
            return False

    def close(self) -> None:
        """Close the client; when it made its own pool (no ``redis_client`` given), also
        disconnect every connection of that pool now rather than at garbage collection."""
        try:
            self.redis.close()
            if self._owns_redis and hasattr(self.redis, "connection_pool"):  # a cluster: closed above
                self.redis.connection_pool.disconnect()
        except Exception:  # pragma: no cover - best effort
            logger.debug("could not close the Redis pool", exc_info=True)

    def _retire(self) -> None:
        """Replaced by a new client (:func:`get_rpc_client`): close its own pool's idle
        connections now; one still in use by a call in another thread is left to finish (and
        closes with the pool)."""
        if not self._owns_redis or not hasattr(self.redis, "connection_pool"):
            return
        try:
            self.redis.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # pragma: no cover - best effort
            logger.debug("could not close the Redis pool", exc_info=True)

    # -- logging -------------------------------------------------------------------------------

    def _log(self, method: str, correlation_id: str, started: float, outcome: str, params: Any) -> None:
        if not self.config.log_rpc_calls:
            return
        duration_ms = (time.monotonic() - started) * 1000
        if self.config.log_rpc_params:
            logger.info(
                "rpc call method=%s correlation_id=%s duration_ms=%.2f outcome=%s params=%s",
                method,
                correlation_id,
                duration_ms,
                outcome,
                protocol.model_to_wire(params),
            )
        else:
            logger.info(
                "rpc call method=%s correlation_id=%s duration_ms=%.2f outcome=%s",
                method,
                correlation_id,
                duration_ms,
                outcome,
            )


def _unknown_method(exc: RPCRemoteError) -> bool:
    """The server said it does not know the method (ours: ``method_not_found``; django-ipc's
    Streams bridge: ``internal_error`` "Unknown RPC method: ...")."""
    if exc.error.code is RPCErrorCode.METHOD_NOT_FOUND:
        return True
    unknown = exc.error.message.startswith("Unknown RPC method")
    return exc.error.code is RPCErrorCode.INTERNAL_ERROR and unknown


_client: WebSocketRPCClient | None = None
_client_lock = threading.Lock()


def get_rpc_client(force_new: bool = False) -> WebSocketRPCClient:
    """The process-wide client, built from Django's ``WEBSOCKET_RPC`` or the environment.
    Thread-safe; ``force_new=True`` rebuilds it (e.g. after settings changed) and closes the
    old one's idle connections at once."""
    global _client
    with _client_lock:
        if _client is None or force_new:
            old = _client
            _client = WebSocketRPCClient(get_config())
            if old is not None:
                old._retire()
        return _client
