"""What a Streams server does with one request: the method table and the path of one entry
(decode, validate, run the handler, reply + ``XACK``, or dead-letter).

:class:`Dispatcher` holds it; :class:`~rpc_tasks.streams.server.RPCServer` adds the consumer
group loops that feed it entries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .. import compat, metrics, protocol
from ..config import WebSocketRPCConfig, get_config
from ..exceptions import RPCException
from ..models.errors import RPCError, RPCErrorCode
from ..redis.connection import client_from_config
from ..signatures import MISSING, infer_models
from .builtins import (
    SYSTEM_PING_METHOD,
    EchoParams,
    EchoResult,
    PingParams,
    PingResult,
    SystemPingParams,
    SystemPingResult,
    echo,
    system_ping,
)
from .io import StreamIO

logger = logging.getLogger("rpc_tasks.streams.server")

#: Bytes of a request's payload kept in its dead-letter entry (with ``payload_bytes``, its size).
DEAD_LETTER_EXCERPT = 4096


@dataclass(frozen=True)
class Handler:
    """A registered method."""

    name: str
    fn: Callable[[Any], Any]
    params_model: type[BaseModel]
    result_model: type[BaseModel] | None


def default_consumer_name() -> str:
    """``<host>-<pid>-<random>``: unique per process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Dispatcher:
    """Registered methods and the processing of one stream entry (see the module docstring).

    Parameters:
      config: settings (stream, group, Redis, TTLs); default :func:`get_config`.
      redis_client: an existing redis-py client (default: one from ``config``).
      stream / group: override ``config.request_stream`` / ``config.consumer_group``.
      consumer_name: this consumer's name in the group (default: host-pid-random).
      max_deliveries: deliveries after which an entry is dead-lettered instead of run again.
      dead_letter_stream: where unprocessable entries go (default ``<stream>:dead``).
      builtins: register ``ping``, ``system.ping`` and ``echo``.
    """

    def __init__(
        self,
        config: WebSocketRPCConfig | None = None,
        *,
        redis_client: Any = None,
        stream: str | None = None,
        group: str | None = None,
        consumer_name: str | None = None,
        max_deliveries: int = 3,
        dead_letter_stream: str | None = None,
        builtins: bool = True,
    ) -> None:
        self.config = config or get_config()
        self._redis_client = redis_client
        self._io: StreamIO | None = None
        self.stream = stream or self.config.request_stream
        self.group = group or self.config.consumer_group
        self.consumer_name = consumer_name or default_consumer_name()
        self.max_deliveries = max_deliveries
        self.dead_letter_stream = dead_letter_stream or f"{self.stream}:dead"
        self.handlers: dict[str, Handler] = {}
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        if builtins:
            self.register("ping", self._ping, params_model=PingParams, result_model=PingResult)
            self.register("echo", echo, params_model=EchoParams, result_model=EchoResult)
            self.register(
                SYSTEM_PING_METHOD, system_ping, params_model=SystemPingParams, result_model=SystemPingResult
            )

    @property
    def io(self) -> StreamIO:
        """Redis access (connection pool created on first use)."""
        if self._io is None:
            client = self._redis_client or client_from_config(self.config)
            self._io = StreamIO(
                client, reply_ttl=self.config.response_key_ttl, pin=self._pin_connections(client)
            )
        return self._io

    def _pin_connections(self, client: Any) -> bool:
        """Whether each thread keeps its own connection (see :class:`StreamIO`)."""
        return False

    # -- registration --------------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[[Any], Any],
        *,
        params_model: type[BaseModel] | None = None,
        result_model: Any = MISSING,
    ) -> Handler:
        """Register ``fn(params) -> result`` as method ``name`` (models from annotations)."""
        if not protocol.METHOD_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid method name {name!r}: must match ^[a-zA-Z0-9_.]+$")
        pm, rm = infer_models(fn, params_model, result_model)
        handler = Handler(name, fn, pm, rm)
        self.handlers[name] = handler
        return handler

    def method(
        self,
        name: str | None = None,
        *,
        params_model: type[BaseModel] | None = None,
        result_model: Any = MISSING,
    ) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
        """Decorator form of :meth:`register` (``name`` defaults to the function name)."""

        def decorator(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
            self.register(name or fn.__name__, fn, params_model=params_model, result_model=result_model)
            return fn

        return decorator

    def _ping(self, params: PingParams) -> PingResult:
        return PingResult(pong=True, server=self.consumer_name, nonce=params.nonce)

    # -- processing one entry ------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._counter_lock:
            self.counters[name] += 1

    def _valid_reply_to(self, reply_to: str | None) -> str | None:
        if reply_to and protocol.is_reply_key(self.config.response_key_prefix, reply_to):
            return reply_to
        return None

    def handle_entry(self, entry_id: str, fields: dict[str, bytes], deliveries: int = 1) -> str:
        """Process one stream entry to the end (reply + ack, or dead-letter). Returns the
        outcome: ``ok``, ``error``, ``expired``, ``dead``, ``fire_and_forget``."""
        limit = self.config.max_payload_bytes
        raw = fields.get(protocol.REQUEST_FIELD)
        if raw is not None and len(raw) > limit:
            return self._too_large(entry_id, raw, limit)
        try:
            request = protocol.decode_request(raw, max_bytes=limit)
        except protocol.RequestDecodeError as exc:
            reply_to = self._valid_reply_to(exc.reply_to)
            payload = None
            if reply_to is not None:
                error = RPCError(code=RPCErrorCode.INVALID_REQUEST, message=f"invalid request: {exc.reason}")
                payload = protocol.encode_response(
                    exc.correlation_id or compat.UNKNOWN_CORRELATION_ID,
                    error=error,
                    extended=exc.wants_error_details,
                )
            self._dead_letter(entry_id, f"invalid request: {exc.reason}", raw, reply_to, payload)
            return "dead"
        reply_to = None if request.is_fire_and_forget else self._valid_reply_to(request.reply_to)
        if not request.is_fire_and_forget and reply_to is None:
            self._dead_letter(entry_id, "reply_to is not under the configured response_key_prefix", raw)
            return "dead"
        if deliveries > self.max_deliveries:
            error = RPCError(
                code=RPCErrorCode.INTERNAL_ERROR,
                message=f"request was delivered {deliveries} times without finishing; dead-lettered",
            )
            payload = self._response(request, error=error) if reply_to else None
            self._dead_letter(
                entry_id,
                f"delivered {deliveries} times (max_deliveries={self.max_deliveries})",
                raw,
                reply_to,
                payload,
            )
            return "dead"
        if request.expired():
            self._count("expired")
            logger.info(
                "Dropping expired request %s (%s, correlation_id=%s)",
                entry_id,
                request.method,
                request.correlation_id,
            )
            self.io.finish(self.stream, self.group, entry_id)
            return "expired"

        with metrics.observe(
            "serve", method=request.method, stream=self.stream, trace_context=request.trace_context
        ):
            return self._serve(entry_id, request, reply_to, raw)

    def _serve(
        self, entry_id: str, request: protocol.Request, reply_to: str | None, raw: bytes | None
    ) -> str:
        """Run the request's handler and reply (or ack a fire-and-forget request)."""
        handler = self.handlers.get(request.method)
        if handler is None:
            error = RPCError(code=RPCErrorCode.METHOD_NOT_FOUND, message=f"unknown method {request.method!r}")
            return self._reply(entry_id, request, reply_to, raw, error=error)
        try:
            params = handler.params_model.model_validate(request.params)
        except ValidationError as exc:
            return self._reply(entry_id, request, reply_to, raw, error=protocol.error_from_exception(exc))
        try:
            result = handler.fn(params)
            if handler.result_model is not None and not isinstance(result, handler.result_model):
                result = handler.result_model.model_validate(result)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a handler too: an error reply, not a redelivery
            if not isinstance(exc, (RPCException, ValidationError)):
                logger.exception("Handler %r failed on %s", request.method, entry_id)
            return self._reply(entry_id, request, reply_to, raw, error=protocol.error_from_exception(exc))
        return self._reply(entry_id, request, reply_to, raw, result=result)

    def _response(
        self, request: protocol.Request, *, result: Any = None, error: RPCError | None = None
    ) -> bytes:
        return protocol.encode_response(
            request.correlation_id,
            result=result if error is None else None,
            error=error,
            extended=request.wants_error_details,
            max_bytes=self.config.max_payload_bytes,
        )

    def _reply(
        self,
        entry_id: str,
        request: protocol.Request,
        reply_to: str | None,
        raw: bytes | None,
        *,
        result: Any = None,
        error: RPCError | None = None,
    ) -> str:
        if request.is_fire_and_forget or reply_to is None:
            if error is not None:
                # Nobody hears about it otherwise: keep the request and say why.
                self._dead_letter(
                    entry_id,
                    f"fire-and-forget request for {request.method!r} failed: {error.wire_code}: "
                    f"{error.message}",
                    raw,
                    level=logging.WARNING,
                    log_reason=f"fire-and-forget request for {request.method!r} failed: {error.wire_code}",
                )
                return "dead"
            _log_finish(self.stream, entry_id, self.io.finish(self.stream, self.group, entry_id), None)
            self._count("fire_and_forget")
            return "fire_and_forget"
        payload = self._response(request, result=result, error=error)
        done = self.io.finish(self.stream, self.group, entry_id, reply_to, payload)
        _log_finish(self.stream, entry_id, done, reply_to)
        outcome = "ok" if error is None else "error"
        self._count(outcome)
        if error is not None:
            metrics.set_outcome(error.wire_code)
        return outcome

    def _too_large(self, entry_id: str, raw: bytes, limit: int) -> str:
        """A request over ``max_payload_bytes``: never parsed; an error reply when its
        ``reply_to`` (found by a bounded scan, not by decoding) is readable and valid."""
        reason = f"payload_too_large: request of {len(raw)} bytes is over max_payload_bytes={limit}"
        reply_to, correlation_id, timeout, extended = _envelope_hints(raw)
        reply_to = self._valid_reply_to(reply_to) if timeout != 0 else None
        payload = None
        if reply_to is not None:
            error = RPCError(code=RPCErrorCode.PAYLOAD_TOO_LARGE, message=reason.split(": ", 1)[1])
            payload = protocol.encode_response(
                correlation_id or compat.UNKNOWN_CORRELATION_ID, error=error, extended=extended
            )
        self._dead_letter(entry_id, reason, raw, reply_to, payload)
        return "dead"

    def _dead_letter(
        self,
        entry_id: str,
        reason: str,
        raw: bytes | None,
        reply_to: str | None = None,
        payload: bytes | None = None,
        *,
        level: int = logging.ERROR,
        log_reason: str | None = None,
    ) -> None:
        self._count("dead")
        metrics.emit("server_dead_lettered", stream=self.stream)
        logger.log(
            level, "Dead-lettering stream entry %s of %s: %s", entry_id, self.stream, log_reason or reason
        )
        data = raw or b""
        fields: dict[str, Any] = {
            "entry_id": entry_id,
            "stream": self.stream,
            "reason": reason,
            "consumer": self.consumer_name,
            "payload": data[:DEAD_LETTER_EXCERPT],
            "payload_bytes": len(data),
        }
        done = self.io.dead_letter(
            self.stream, self.group, entry_id, self.dead_letter_stream, fields, reply_to, payload
        )
        if reply_to is not None and payload is not None:
            _log_finish(self.stream, entry_id, done, reply_to)

    def _dead_letter_trimmed(self, gone: str) -> None:
        self._count("trimmed")
        metrics.emit("server_dead_lettered", stream=self.stream)
        logger.error(
            "Pending entry %s was trimmed from %s before it was processed (stream_maxlen too small "
            "for the backlog)",
            gone,
            self.stream,
        )
        self.io.dead_letter(
            self.stream,
            self.group,
            gone,
            self.dead_letter_stream,
            {"entry_id": gone, "stream": self.stream, "reason": "trimmed", "consumer": self.consumer_name},
        )


def _log_finish(stream: str, entry_id: str, done: str, reply_to: str | None) -> None:
    """Say what :meth:`StreamIO.finish` really did when it is not the plain case."""
    if done == "wrongtype":
        logger.warning(
            "Entry %s of %s was acked but its reply was not sent: %s holds a value that is not a "
            "list (WRONGTYPE); the key was left untouched",
            entry_id,
            stream,
            reply_to,
        )
    elif done == "not_pending":
        logger.info(
            "Entry %s of %s had already been acked (by another consumer, or a retried command); "
            "its reply was not pushed again",
            entry_id,
            stream,
        )


_HINTS = {
    name: re.compile(rb'"%s"\s*:\s*("(?:[^"\\]|\\.){0,512}"|\d{1,12})' % name.encode())
    for name in ("reply_to", "correlation_id", "timeout")
}
_HINTS["extensions"] = re.compile(rb'"extensions"\s*:\s*(\[[^\]]{0,512}\])')


def _envelope_hints(raw: bytes) -> tuple[str | None, str | None, int | None, bool]:
    """``(reply_to, correlation_id, timeout, wants_error_details)`` of a request too large to
    decode, found by a linear scan for the first occurrence of each key (``None`` when absent
    or odd)."""
    found: dict[str, Any] = {}
    for name, pattern in _HINTS.items():
        match = pattern.search(raw)
        if match is None:
            continue
        try:
            found[name] = json.loads(match.group(1))
        except ValueError:
            continue
    reply_to, cid, timeout = found.get("reply_to"), found.get("correlation_id"), found.get("timeout")
    extensions = found.get("extensions")
    return (
        reply_to if isinstance(reply_to, str) else None,
        cid if isinstance(cid, str) and 0 < len(cid) <= 128 else None,
        timeout if isinstance(timeout, int) else None,
        isinstance(extensions, list) and protocol.ERROR_DETAILS_EXTENSION in extensions,
    )
