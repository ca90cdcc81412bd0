"""``AsyncWebSocketRPCClient``: :class:`~rpc_tasks.streams.client.WebSocketRPCClient` for
``asyncio``.

Same requests (:func:`rpc_tasks.protocol.encode_request`, the ``XADD`` of
:meth:`StreamIO.request_command <rpc_tasks.streams.io.StreamIO.request_command>`), same
replies, same errors: a server cannot tell the two apart. A lone call waits on its own reply
key, as the sync client does (:mod:`rpc_tasks.aio.lane`); concurrent calls give the loop's
reply inbox as their address (a list under ``response_key_prefix``, see
:mod:`rpc_tasks.aio.replies`), which servers treat like any other reply address, and their
commands go through the loop's pipe: any number of concurrent calls share three connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, TypeVar

import redis
from pydantic import BaseModel

from .. import metrics, protocol
from ..config import WebSocketRPCConfig, get_config
from ..exceptions import RPCConnectionError, RPCException, RPCRemoteError, RPCTimeoutError
from ..models.base import new_correlation_id
from ..models.errors import RPCError
from ..streams.builtins import PING_METHOD, PingParams, PingResult
from ..streams.io import StreamIO
from .connection import ConnectionSpec, loop_local
from .lane import FastLane, FirstCommandFailed
from .replies import ReplyReader, stop_waiting_for

logger = logging.getLogger(__name__)

TResult = TypeVar("TResult", bound=BaseModel)


class AsyncWebSocketRPCClient:
    """Coroutine twin of ``WebSocketRPCClient`` (one instance per process is enough, usable
    from any number of event loops; see :func:`get_async_rpc_client`).

    The connections are the event loop's, not the instance's: clients with the same
    ``redis_url``, ``response_key_prefix`` and ``max_payload_bytes`` share one reply reader,
    pipe and fast lane per loop, so a client made per request (e.g. in an async Django view)
    opens no connection of its own and leaves nothing behind when dropped.

    Parameters:
      config: settings; default :func:`rpc_tasks.config.get_config`.
    """

    def __init__(self, config: WebSocketRPCConfig | None = None) -> None:
        self.config = config or get_config()
        self.spec = ConnectionSpec.from_url(self.config.redis_url)
        #: Keys of the loop's reader and lane (see the class docstring): not the instance, which
        #: the loop's table would keep alive, with up to three connections, until the loop ends.
        self._reader_key = (
            "ws-client",
            self.config.redis_url,
            self.config.response_key_prefix,
            self.config.max_payload_bytes,
        )
        self._lane_key = ("ws-lane", self.config.redis_url)
        self._extensions = (
            frozenset({protocol.ERROR_DETAILS_EXTENSION}) if self.config.announce_extensions else frozenset()
        )

    def __repr__(self) -> str:
        return f"AsyncWebSocketRPCClient(redis_url={self.config.redacted()['redis_url']!r})"

    def _reader(self) -> ReplyReader:
        config = self.config

        def build() -> ReplyReader:
            return ReplyReader(
                self.spec, prefix=config.response_key_prefix, max_bytes=config.max_payload_bytes
            )

        reader: ReplyReader = loop_local(self._reader_key, build)
        return reader

    async def _run(self, what: str, command: tuple[Any, ...]) -> Any:
        try:
            return await self._reader().pipe.submit(command)
        except (redis.RedisError, OSError) as exc:
            raise RPCConnectionError(f"Redis {what} failed: {exc}") from exc

    @metrics.observed_async("stream_call", lambda client, method, *_, **__: {"actor": method})
    async def call(
        self,
        method: str,
        params: BaseModel,
        result_model: type[TResult],
        timeout: float | None = None,
    ) -> TResult:
        """Call ``method`` and await its result, validated into ``result_model``; same
        arguments and errors as ``WebSocketRPCClient.call``."""
        timeout = protocol.check_timeout(timeout, self.config.rpc_timeout)
        if timeout > protocol.MAX_REQUEST_TIMEOUT:
            raise ValueError(f"timeout must be at most {protocol.MAX_REQUEST_TIMEOUT} s")
        started = time.monotonic()
        correlation_id = new_correlation_id()
        outcome = "error"
        try:
            response = await self._request(method, params, correlation_id, timeout)
            if response is None:
                outcome = "timeout"
                raise RPCTimeoutError(method, timeout)
            if not response.success:
                error = response.error or RPCError(message="remote call failed")
                outcome = f"remote_error:{error.wire_code}"
                raise RPCRemoteError(error)
            result = result_model.model_validate(response.result)
            outcome = "ok"
            return result
        finally:
            self._log(method, correlation_id, started, outcome)

    def _encode(
        self, method: str, params: BaseModel, correlation_id: str, reply_to: str, timeout: float
    ) -> bytes:
        return protocol.encode_request(
            method,
            params,
            reply_to=reply_to,
            timeout=protocol.wire_timeout(timeout),
            correlation_id=correlation_id,
            extensions=self._extensions,
            max_bytes=self.config.max_payload_bytes,
            trace_context=metrics.trace_context() if self._extensions else None,
        )

    async def _request(
        self, method: str, params: BaseModel, correlation_id: str, timeout: float
    ) -> protocol.Response | None:
        """Send the request and wait for its decoded response (``None``: timed out). A lone
        call uses the fast lane (its own reply key, one round trip), others the loop's inbox."""
        reader = self._reader()
        lane: FastLane = loop_local(self._lane_key, lambda: FastLane(self.spec))
        stream, maxlen = self.config.request_stream, self.config.stream_maxlen
        if not reader.waiting and not lane.busy:
            reply_to = protocol.reply_key(self.config.response_key_prefix, correlation_id)
            payload = self._encode(method, params, correlation_id, reply_to, timeout)
            try:
                raw = await lane.request(StreamIO.request_command(stream, payload, maxlen), reply_to, timeout)
            except FirstCommandFailed as exc:
                raise RPCConnectionError(f"Redis XADD failed: {exc}") from exc.__cause__
            except (redis.RedisError, OSError) as exc:
                raise RPCConnectionError(f"lost Redis while waiting for a reply: {exc}") from exc
            return (
                None
                if raw is None
                else protocol.decode_response(raw, max_bytes=self.config.max_payload_bytes)
            )
        loop = asyncio.get_running_loop()
        future = reader.expect(correlation_id, (loop.time() + timeout, method, timeout))
        try:
            payload = self._encode(method, params, correlation_id, reader.inbox, timeout)
            sent = reader.pipe.submit(StreamIO.request_command(stream, payload, maxlen))
            # The deadline (or a lost reply connection) ends the wait for the XADD too: a
            # frozen Redis must not hold the call past it.
            stop = stop_waiting_for(sent)
            future.add_done_callback(stop)
            try:
                await sent
                return await future
            except RPCTimeoutError:
                return None
            except (redis.RedisError, OSError) as exc:
                raise RPCConnectionError(f"Redis XADD failed: {exc}") from exc
            finally:
                future.remove_done_callback(stop)
        finally:
            reader.forget(correlation_id)
            if future.done() and not future.cancelled():
                future.exception()

    @metrics.observed_async("stream_send", lambda client, method, *_, **__: {"actor": method})
    async def fire_and_forget(self, method: str, params: BaseModel) -> str:
        """Send a request nobody waits for (``timeout = 0``); returns the stream entry id."""
        started = time.monotonic()
        correlation_id = new_correlation_id()
        trace = metrics.trace_context() if self._extensions else None
        payload = protocol.encode_request(
            method,
            params,
            reply_to=protocol.reply_key(self.config.response_key_prefix, correlation_id),
            timeout=0,
            correlation_id=correlation_id,
            extensions=self._extensions if trace else (),
            max_bytes=self.config.max_payload_bytes,
            trace_context=trace,
        )
        outcome = "error"
        try:
            command = StreamIO.request_command(self.config.request_stream, payload, self.config.stream_maxlen)
            entry_id = await self._run("XADD", command)
            outcome = "sent"
            return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        finally:
            self._log(method, correlation_id, started, outcome)

    async def broadcast(self, channel: str, message: BaseModel) -> int:
        """Publish ``message`` (JSON) on a Pub/Sub channel; returns how many subscribers got it."""
        if not channel or not isinstance(channel, str):
            raise ValueError("channel must be a non-empty string")
        data = protocol.dumps(
            protocol.model_to_wire(message), max_bytes=self.config.max_payload_bytes, what="broadcast"
        )
        count = int(await self._run("PUBLISH", ("PUBLISH", channel, data)))
        if self.config.log_rpc_calls:
            logger.info("rpc broadcast channel=%s subscribers=%d", channel, count)
        return count

    async def health_check(self, timeout: float = 5) -> bool:
        """True when a server answers the built-in ``ping`` within ``timeout`` s. Never raises
        (but lets cancellation through)."""
        try:
            result = await self.call(PING_METHOD, PingParams(), PingResult, timeout=timeout)
            return bool(result.pong)
        except (RPCException, ValueError) as exc:
            logger.debug("health check failed: %s", exc)
            return False
        except Exception:  # never raise from a health check
            logger.debug("health check failed", exc_info=True)
            return False

    def _log(self, method: str, correlation_id: str, started: float, outcome: str) -> None:
        if self.config.log_rpc_calls:
            logger.info(
                "rpc call method=%s correlation_id=%s duration_ms=%.2f outcome=%s",
                method,
                correlation_id,
                (time.monotonic() - started) * 1000,
                outcome,
            )


_client: AsyncWebSocketRPCClient | None = None
_client_lock = threading.Lock()


def get_async_rpc_client(force_new: bool = False) -> AsyncWebSocketRPCClient:
    """The process-wide async client, built from Django's ``WEBSOCKET_RPC`` or the environment
    (``force_new=True`` rebuilds it, e.g. after settings changed)."""
    global _client
    with _client_lock:
        if _client is None or force_new:
            _client = AsyncWebSocketRPCClient(get_config())
        return _client
