"""``RPCServer``: the consumer side of the Streams protocol.

Register handlers by method name, then run consumers in a consumer group::

    server = RPCServer()

    @server.method("send_notification")
    def send_notification(params: NotificationRequest) -> NotificationResponse:
        ...

    server.serve_forever()          # or: rpc-tasks serve --app myapp.rpc:server

Guarantees:

* validate params, call the handler, reply (``LPUSH`` + ``EXPIRE``) and ``XACK`` in one
  transaction; fire-and-forget requests (``timeout = 0``) get no reply;
* unknown method -> ``method_not_found``; invalid params -> ``validation_error`` with field
  details; handler exceptions -> error replies keeping an ``RPCRemoteError``'s code and
  ``retry_after`` (structured details only for clients that announced ``error_details``);
* a request whose ``timestamp + timeout`` has passed is acked and dropped without running;
* entries left pending by a dead consumer are reclaimed (``XAUTOCLAIM``) after ``claim_idle``
  seconds; a live consumer keeps resetting the idle time of the entries it is still working on
  (``XCLAIM ... JUSTID`` every ``claim_interval``), so a slow handler is never run twice;
* an entry delivered more than ``max_deliveries`` times, or that cannot be parsed, goes
  to the dead-letter stream (``<stream>:dead``) with the reason, gets an error reply when its
  ``reply_to`` is readable, and is acked: no crash loop;
* graceful stop: stop reading, finish in-flight requests, ack them, return.

Trimming rule: the server never trims the request stream (clients ``XADD`` with
``MAXLEN ~ stream_maxlen``). Entries trimmed while still pending are reported by ``XAUTOCLAIM``;
the server logs each one as an error and records it on the dead-letter stream (reason
``trimmed``), and warns when pending + unread entries pass half of ``stream_maxlen``. Size
``stream_maxlen`` above the largest backlog you expect.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from . import protocol
from .actor import _MISSING, _infer_models
from .config import WebSocketRPCConfig, get_config
from .exceptions import RPCException
from .models.errors import RPCError, RPCErrorCode
from .redis_io import StreamEntry, StreamIO, client_from_config, release_thread_connections

logger = logging.getLogger("rpc_tasks.server")


class PingParams(BaseModel):
    """Params of the built-in ``ping`` method."""

    nonce: str | None = Field(default=None, max_length=128)


class PingResult(BaseModel):
    """Result of ``ping``: proves a server consumed the request."""

    pong: bool = True
    server: str = ""
    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    nonce: str | None = None


class EchoParams(BaseModel):
    """Params of the built-in ``echo`` method."""

    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class EchoResult(EchoParams):
    """``echo`` returns its params."""


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


class RPCServer:
    """Serve RPC methods from a Redis Stream with a consumer group (see the module docstring).

    Parameters:
      config: settings (stream, group, Redis, TTLs); default :func:`get_config`.
      stream / group: override ``config.request_stream`` / ``config.consumer_group`` (the
        Django bridge uses ``bridge_stream``).
      consumer_name: this consumer's name in the group (default: host-pid-random).
      concurrency: handler threads (requests processed at once).
      claim_idle: seconds a pending entry must be idle before another consumer reclaims it.
      max_deliveries: deliveries after which an entry is dead-lettered instead of run again.
      builtins: register ``ping`` and ``echo``.
    """

    def __init__(
        self,
        config: WebSocketRPCConfig | None = None,
        *,
        redis_client: Any = None,
        stream: str | None = None,
        group: str | None = None,
        consumer_name: str | None = None,
        concurrency: int = 8,
        claim_idle: float = 30.0,
        claim_interval: float = 5.0,
        max_deliveries: int = 3,
        dead_letter_stream: str | None = None,
        block_ms: int = 1000,
        builtins: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if claim_idle < 2 * claim_interval:
            raise ValueError(
                "claim_idle must be at least twice claim_interval (in-flight entries are "
                "refreshed every claim_interval)"
            )
        self.config = config or get_config()
        self._redis_client = redis_client
        self._io: StreamIO | None = None
        self.stream = stream or self.config.request_stream
        self.group = group or self.config.consumer_group
        self.consumer_name = consumer_name or default_consumer_name()
        self.concurrency = concurrency
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self.max_deliveries = max_deliveries
        self.dead_letter_stream = dead_letter_stream or f"{self.stream}:dead"
        self.block_ms = block_ms
        self.handlers: dict[str, Handler] = {}
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._thread: threading.Thread | None = None
        self._in_flight: set[str] = set()
        self._quiet_until = 0.0
        if builtins:
            self.register("ping", self._ping, params_model=PingParams, result_model=PingResult)
            self.register("echo", _echo, params_model=EchoParams, result_model=EchoResult)

    @property
    def io(self) -> StreamIO:
        """Redis access (connection pool created on first use)."""
        if self._io is None:
            client = self._redis_client or client_from_config(self.config)
            # One kept connection per reader/handler thread (plus the reclaim pool's), if the
            # pool has room for them; otherwise a pool checkout per command.
            room = getattr(client.connection_pool, "max_connections", 0) or 0
            self._io = StreamIO(
                client, reply_ttl=self.config.response_key_ttl, pin=room >= 2 * self.concurrency + 4
            )
        return self._io

    # -- registration --------------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[[Any], Any],
        *,
        params_model: type[BaseModel] | None = None,
        result_model: Any = _MISSING,
    ) -> Handler:
        """Register ``fn(params) -> result`` as method ``name`` (models from annotations)."""
        if not protocol.METHOD_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid method name {name!r}: must match ^[a-zA-Z0-9_.]+$")
        pm, rm = _infer_models(fn, params_model, result_model)
        handler = Handler(name, fn, pm, rm)
        self.handlers[name] = handler
        return handler

    def method(
        self,
        name: str | None = None,
        *,
        params_model: type[BaseModel] | None = None,
        result_model: Any = _MISSING,
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
        try:
            request = protocol.decode_request(raw, max_bytes=limit)
        except protocol.RequestDecodeError as exc:
            reply_to = self._valid_reply_to(exc.reply_to)
            payload = None
            if reply_to is not None:
                error = RPCError(code=RPCErrorCode.INVALID_REQUEST, message=f"invalid request: {exc.reason}")
                payload = protocol.encode_response(
                    exc.correlation_id or "unknown", error=error, extended=False
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

        handler = self.handlers.get(request.method)
        if handler is None:
            error = RPCError(code=RPCErrorCode.METHOD_NOT_FOUND, message=f"unknown method {request.method!r}")
            return self._reply(entry_id, request, reply_to, error=error)
        try:
            params = handler.params_model.model_validate(request.params)
        except ValidationError as exc:
            return self._reply(entry_id, request, reply_to, error=protocol.error_from_exception(exc))
        try:
            result = handler.fn(params)
            if handler.result_model is not None and not isinstance(result, handler.result_model):
                result = handler.result_model.model_validate(result)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a handler too: an error reply, not a redelivery
            if not isinstance(exc, (RPCException, ValidationError)):
                logger.exception("Handler %r failed on %s", request.method, entry_id)
            return self._reply(entry_id, request, reply_to, error=protocol.error_from_exception(exc))
        return self._reply(entry_id, request, reply_to, result=result)

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
        *,
        result: Any = None,
        error: RPCError | None = None,
    ) -> str:
        if request.is_fire_and_forget or reply_to is None:
            self.io.finish(self.stream, self.group, entry_id)
            self._count("fire_and_forget")
            return "fire_and_forget"
        self.io.finish(
            self.stream, self.group, entry_id, reply_to, self._response(request, result=result, error=error)
        )
        outcome = "ok" if error is None else "error"
        self._count(outcome)
        return outcome

    def _dead_letter(
        self,
        entry_id: str,
        reason: str,
        raw: bytes | None,
        reply_to: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        self._count("dead")
        logger.error("Dead-lettering stream entry %s of %s: %s", entry_id, self.stream, reason)
        fields: dict[Any, Any] = {
            "entry_id": entry_id,
            "stream": self.stream,
            "reason": reason,
            "consumer": self.consumer_name,
            "payload": (raw or b"")[: self.config.max_payload_bytes],
        }
        self.io.dead_letter(
            self.stream, self.group, entry_id, self.dead_letter_stream, fields, reply_to, payload
        )

    # -- consumer loop -------------------------------------------------------------------------

    def _submit(
        self, pool: ThreadPoolExecutor, entry: StreamEntry, deliveries: int, slots: threading.Semaphore
    ) -> None:
        with self._counter_lock:
            self._in_flight.add(entry[0])
        try:
            pool.submit(self._run_pooled, entry, deliveries, slots)
        except BaseException:  # e.g. the pool refuses work at interpreter shutdown
            with self._counter_lock:
                self._in_flight.discard(entry[0])  # stays pending: reclaimed later
            raise

    def _unavailable(self, exc: Exception, backoff: float) -> None:
        """Log a Redis outage: every reader thread sees it, so one warning per 5 s for the
        whole server (the others at DEBUG) instead of one per thread per retry."""
        now = time.monotonic()
        with self._counter_lock:
            loud = now >= self._quiet_until
            if loud:
                self._quiet_until = now + 5.0
        logger.log(
            logging.WARNING if loud else logging.DEBUG,
            "Redis unavailable (%s); retrying in %.1fs",
            exc,
            backoff,
        )

    def _run_pooled(self, entry: StreamEntry, deliveries: int, slots: threading.Semaphore) -> None:
        # A pool thread may sit idle for long: it keeps no connection of its own.
        try:
            self._run_one(entry, deliveries, slots)
        finally:
            release_thread_connections()

    def _run_one(self, entry: StreamEntry, deliveries: int, slots: threading.Semaphore) -> None:
        entry_id, fields = entry
        try:
            self.handle_entry(entry_id, fields, deliveries)
        except RPCException:
            # Redis is unreachable: the entry stays pending and is reclaimed later.
            self._count("redis_errors")
            logger.warning("Could not finish entry %s; it stays pending for reclaim", entry_id, exc_info=True)
        except BaseException:  # a bug, or e.g. SystemExit from a handler: keep this thread alive
            self._count("internal_errors")
            logger.exception("Unexpected failure on entry %s; it stays pending for reclaim", entry_id)
        finally:
            with self._counter_lock:
                self._in_flight.discard(entry_id)
            slots.release()

    def _reclaim(self, pool: ThreadPoolExecutor, slots: threading.Semaphore) -> None:
        start = "0-0"
        while not self._stopping.is_set():
            free = _take_slots(slots, self.concurrency)
            if free == 0:
                return
            submitted = 0
            try:
                start, entries, deleted = self.io.autoclaim(
                    self.stream, self.group, self.consumer_name, int(self.claim_idle * 1000), start, free
                )
                for gone in deleted:
                    self._dead_letter_trimmed(gone)
                with self._counter_lock:
                    mine = set(self._in_flight)
                fresh = [e for e in entries if e[0] not in mine]
                counts = self.io.deliveries(self.stream, self.group, [e[0] for e in fresh])
                for entry in fresh:
                    self._count("reclaimed")
                    self._submit(pool, entry, counts.get(entry[0], self.max_deliveries + 1), slots)
                    submitted += 1  # its handler gives the slot back
            finally:
                for _ in range(free - submitted):  # a Redis error must not cost handler slots
                    slots.release()
            if start in ("0-0", "0") or not entries:
                return

    def _dead_letter_trimmed(self, gone: str) -> None:
        self._count("trimmed")
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

    def _check_backlog(self) -> None:
        pending, lag = self.io.backlog(self.stream, self.group)
        if pending + max(lag, 0) > self.config.stream_maxlen // 2:
            logger.warning(
                "Stream %s backlog is %d pending + %d unread of stream_maxlen=%d: entries may be trimmed "
                "before they are processed",
                self.stream,
                pending,
                lag,
                self.config.stream_maxlen,
            )

    def serve_forever(self) -> None:
        """Consume until :meth:`stop` is called (or SIGTERM/SIGINT via the CLI).

        With room in the Redis pool for a connection per thread (``redis_max_connections`` >=
        2 x ``concurrency`` + 4, the default for ``concurrency`` <= 23), ``concurrency`` reader
        threads each read and run their own entries (no hand-over between threads); otherwise
        one reader hands entries to a pool of ``concurrency`` handler threads.
        """
        self._stopping.clear()
        self._stopped.clear()
        logger.info(
            "RPC server %s consuming %s (group %s, %d methods)",
            self.consumer_name,
            self.stream,
            self.group,
            len(self.handlers),
        )
        slots = threading.Semaphore(self.concurrency)
        if self.io.pin:
            self._serve_with_readers(slots)
        else:
            self._serve_with_one_reader(slots)

    def _maintain(self, pool: ThreadPoolExecutor, slots: threading.Semaphore) -> None:
        """Every ``claim_interval``: (re)create the group, refresh in-flight entries, reclaim
        dead consumers' entries, watch the backlog."""
        self.io.ensure_group(self.stream, self.group)
        with self._counter_lock:
            busy = sorted(self._in_flight)
        self.io.touch(self.stream, self.group, self.consumer_name, busy)
        self._reclaim(pool, slots)
        self._check_backlog()

    def _serve_with_readers(self, slots: threading.Semaphore) -> None:
        """``concurrency`` reader threads each block on ``XREADGROUP ... COUNT 1`` and run the
        entry they get themselves (no hand-over between threads); this thread refreshes
        in-flight entries, reclaims dead consumers' entries (run on a small pool) and watches
        the backlog every ``claim_interval``. A shared semaphore keeps the handlers running at
        once at ``concurrency``.
        """
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="rpc-server-claimed")
        readers: list[threading.Thread] = []
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    self._maintain(pool, slots)
                    if not readers:
                        readers = [
                            threading.Thread(
                                target=self._read_loop, args=(slots,), name=f"rpc-server-{i}", daemon=True
                            )
                            for i in range(self.concurrency)
                        ]
                        for reader in readers:
                            reader.start()
                    backoff = 0.1
                    self._stopping.wait(self.claim_interval)
                except RPCException as exc:
                    self._unavailable(exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self._stopping.set()
            for reader in readers:
                reader.join()  # each finishes (and acks) the entry it holds
            pool.shutdown(wait=True)
            self._stopped.set()
            logger.info("RPC server %s stopped", self.consumer_name)

    def _serve_with_one_reader(self, slots: threading.Semaphore) -> None:
        """One reader thread (this one) hands entries to ``concurrency`` handler threads."""
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="rpc-server")
        next_claim = 0.0
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    if next_claim <= time.monotonic():
                        self._maintain(pool, slots)
                        next_claim = time.monotonic() + self.claim_interval
                    if not slots.acquire(timeout=0.2):
                        continue
                    free = 1 + _take_slots(slots, self.concurrency - 1)
                    block = max(1, min(self.block_ms, int(self.claim_interval * 1000)))
                    try:
                        entries = self.io.read(self.stream, self.group, self.consumer_name, free, block)
                    except BaseException:
                        for _ in range(free):  # a failed read must not cost handler slots
                            slots.release()
                        raise
                    submitted = 0
                    try:
                        for entry in entries:
                            self._submit(pool, entry, 1, slots)
                            submitted += 1  # its handler gives the slot back
                    finally:
                        for _ in range(free - submitted):
                            slots.release()
                    if entries:
                        # Let the handler thread woken for the entry take the GIL now rather
                        # than at this thread's next blocking read (a shorter hand-over).
                        time.sleep(0)
                    backoff = 0.1
                except RPCException as exc:
                    self._unavailable(exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    next_claim = 0.0
                except Exception:  # a bug: log it and keep serving (as the readers mode does)
                    logger.exception("Unexpected failure reading %s", self.stream)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    next_claim = 0.0
        finally:
            pool.shutdown(wait=True)  # finish (and ack) what is in flight
            self._stopped.set()
            logger.info("RPC server %s stopped", self.consumer_name)

    def _read_loop(self, slots: threading.Semaphore) -> None:
        # No slot is held while blocked in XREADGROUP (the reclaim pool needs them too): a
        # reader takes one once it holds an entry, so handlers stay at most ``concurrency``.
        try:
            self._read_entries(slots)
        finally:
            release_thread_connections()  # else a restarted server could find its pool used up

    def _read_entries(self, slots: threading.Semaphore) -> None:
        block = max(1, min(self.block_ms, int(self.claim_interval * 1000)))
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                entries = self.io.read(self.stream, self.group, self.consumer_name, 1, block)
            except RPCException as exc:
                self._unavailable(exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # pragma: no cover - a bug; keep this reader alive
                logger.exception("Unexpected failure reading %s", self.stream)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for entry in entries:
                with self._counter_lock:
                    self._in_flight.add(entry[0])
                slots.acquire()
                self._run_one(entry, 1, slots)  # releases the slot

    def start(self) -> threading.Thread:
        """Run :meth:`serve_forever` in a background thread."""
        self._stopped.clear()
        self._thread = threading.Thread(target=self.serve_forever, name="rpc-server", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop reading, let in-flight requests finish and ack, wait up to ``timeout``."""
        self._stopping.set()
        return self._stopped.wait(timeout)


def _echo(params: EchoParams) -> EchoResult:
    return EchoResult(message=params.message, data=params.data)


def _take_slots(slots: threading.Semaphore, most: int) -> int:
    taken = 0
    while taken < most and slots.acquire(blocking=False):
        taken += 1
    return taken
