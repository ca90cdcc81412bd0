"""``RPCServer``: the consumer side of the Streams protocol.

Register handlers by method name, then run consumers in a consumer group::

    server = RPCServer()

    @server.method("send_notification")
    def send_notification(params: NotificationRequest) -> NotificationResponse:
        ...

    server.serve_forever()          # or: rpc-tasks serve --app myapp.rpc:server

Guarantees:

* validate params, call the handler, ``XACK`` and reply (``LPUSH`` + ``EXPIRE``, only onto a
  list or a free key) in one script; fire-and-forget requests (``timeout = 0``) get no reply,
  and one that fails is dead-lettered with the reason (logged at WARNING);
* unknown method -> ``method_not_found``; invalid params -> ``validation_error`` with field
  details; handler exceptions -> error replies keeping an ``RPCRemoteError``'s code and
  ``retry_after`` (structured details only for clients that announced ``error_details``);
* a request whose ``timestamp + timeout`` has passed is acked and dropped without running;
* entries left pending by a dead consumer are reclaimed (``XAUTOCLAIM``) after ``claim_idle``
  seconds; a live consumer keeps resetting the idle time of the entries it is still working on
  (``XCLAIM ... JUSTID`` every ``claim_interval``, first thing in each maintenance pass), so a
  slow handler is never run twice;
* after a Redis outage (a failed or held-up pass or read) nothing is reclaimed for
  ``claim_idle``: idle times then include the outage, when nobody could refresh anything, and
  live consumers refresh theirs within ``claim_interval / 2`` of Redis answering again;
* an entry delivered more than ``max_deliveries`` times, that cannot be parsed or is over
  ``max_payload_bytes``, goes to the dead-letter stream (``<stream>:dead``, a 4 KiB excerpt and
  the size) with the reason, gets an error reply when its ``reply_to`` is readable, and is
  acked: no crash loop;
* graceful stop: stop reading, finish in-flight requests, ack them, return.

Trimming rule: the server never trims the request stream (clients ``XADD`` with
``MAXLEN ~ stream_maxlen``). Entries trimmed while still pending are reported by ``XAUTOCLAIM``;
the server logs each one as an error and records it on the dead-letter stream (reason
``trimmed``), and warns when pending + unread entries pass half of ``stream_maxlen``. Size
``stream_maxlen`` above the largest backlog you expect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .. import metrics
from ..config import WebSocketRPCConfig
from ..exceptions import RPCException
from ..redis.connection import release_thread_connections
from .dispatch import Dispatcher
from .io import StreamEntry

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RPCServer(Dispatcher):
    """Serve RPC methods from a Redis Stream with a consumer group (see the module docstring).

    Parameters (besides :class:`~rpc_tasks.streams.dispatch.Dispatcher`'s):
      concurrency: handler threads (requests processed at once).
      claim_idle: seconds a pending entry must be idle before another consumer reclaims it.
      claim_interval: seconds between maintenance passes (refresh in-flight entries, reclaim).
      block_ms: longest blocking read.
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
        super().__init__(
            config,
            redis_client=redis_client,
            stream=stream,
            group=group,
            consumer_name=consumer_name,
            max_deliveries=max_deliveries,
            dead_letter_stream=dead_letter_stream,
            builtins=builtins,
        )
        self.concurrency = concurrency
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self.block_ms = block_ms
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._thread: threading.Thread | None = None
        self._in_flight: set[str] = set()
        self._outages = _Outages(claim_idle, claim_interval)

    def _pin_connections(self, client: Any) -> bool:
        # One kept connection per reader/handler thread (plus the reclaim pool's), if the pool
        # has room for them; otherwise a pool checkout per command.
        room = getattr(getattr(client, "connection_pool", None), "max_connections", 0) or 0  # 0: a cluster
        return bool(room >= 2 * self.concurrency + 4)

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
        except RPCException as exc:
            # Redis did not take the ack (or the connection broke before its answer): the
            # entry stays pending and is reclaimed later, unless the ack got through.
            self._count("redis_errors")
            msg = (
                "Could not finish entry %s (%s); it stays pending (unless Redis took the ack before it broke)"
            )
            logger.warning(msg, entry_id, exc)
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
                sent = time.monotonic()
                start, entries, deleted = self.io.autoclaim(
                    self.stream, self.group, self.consumer_name, int(self.claim_idle * 1000), start, free
                )
                if self._outages.held_up(sent):  # its idle times include the stall: run nothing
                    logger.info("A reclaim Redis held up claimed %d entries; not running them", len(entries))
                    return
                for gone in deleted:
                    self._dead_letter_trimmed(gone)
                with self._counter_lock:
                    fresh = [e for e in entries if e[0] not in self._in_flight]
                counts = self.io.deliveries(
                    self.stream, self.group, self.consumer_name, [e[0] for e in fresh]
                )
                for entry in (e for e in fresh if e[0] in counts):  # others: acked/taken since
                    self._count("reclaimed")
                    self._submit(pool, entry, counts[entry[0]], slots)
                    submitted += 1  # its handler gives the slot back
            finally:
                for _ in range(free - submitted):  # a Redis error must not cost handler slots
                    slots.release()
            if start in ("0-0", "0") or not entries:
                return

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
        """Every ``claim_interval``: refresh in-flight entries first (``XCLAIM`` works even
        when Redis is over ``maxmemory``), (re)create the group, then reclaim dead consumers'
        entries (unless Redis was unavailable lately, see :meth:`_Outages.trusted`) and watch
        the backlog."""
        with self._counter_lock:
            busy = sorted(self._in_flight)
        self._outages.timed(self.io.touch, self.stream, self.group, self.consumer_name, busy)
        self._outages.timed(self.io.ensure_group, self.stream, self.group)
        if self._outages.trusted():
            self._reclaim(pool, slots)
        _check_backlog(self)

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
                    self._outages.report(exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self._outages.max_backoff)
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
                        entries = self._outages.timed(self._read, free, block, expected=block / 1000)
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
                    self._outages.report(exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self._outages.max_backoff)
                    next_claim = 0.0
                except Exception:  # a bug: log it and keep serving (as the readers mode does)
                    logger.exception("Unexpected failure reading %s", self.stream)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self._outages.max_backoff)
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
                entries = self._outages.timed(self._read, 1, block, expected=block / 1000)
            except RPCException as exc:
                self._outages.report(exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._outages.max_backoff)
                continue
            except Exception:  # pragma: no cover - a bug; keep this reader alive
                logger.exception("Unexpected failure reading %s", self.stream)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._outages.max_backoff)
                continue
            backoff = 0.1
            for entry in entries:
                with self._counter_lock:
                    self._in_flight.add(entry[0])
                slots.acquire()
                self._run_one(entry, 1, slots)  # releases the slot

    def _read(self, count: int, block_ms: int) -> list[StreamEntry]:
        return self.io.read(self.stream, self.group, self.consumer_name, count, block_ms)

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


def _take_slots(slots: threading.Semaphore, most: int) -> int:
    taken = 0
    while taken < most and slots.acquire(blocking=False):
        taken += 1
    return taken


class _Outages:
    """What this server saw of Redis outages: it logs them (every reader thread sees one, so
    one warning per 5 s for the whole server, the others at DEBUG) and decides whether idle
    times can be trusted for reclaiming (see :meth:`trusted`)."""

    def __init__(self, claim_idle: float, claim_interval: float) -> None:
        self._lock = threading.Lock()
        self._quiet_until = 0.0
        self._claim_idle = claim_idle
        #: A call this much slower than expected was held up by Redis (an outage).
        self._slow = max(0.1, claim_interval / 2)
        #: Longest wait between retries after a failure: in-flight entries are refreshed again
        #: soon after Redis is back, well before another consumer may reclaim them.
        self.max_backoff = min(5.0, self._slow)
        self._distrust_until = 0.0

    def seen(self) -> None:
        """Redis failed, or held a command up, just now."""
        self._distrust_until = time.monotonic() + self._claim_idle

    def held_up(self, started: float, expected: float = 0.0) -> bool:
        """Whether a command sent at ``started`` (monotonic) that should take ``expected``
        seconds was held up by Redis (``slow`` seconds more); if so it counts as an outage.
        An ``XAUTOCLAIM`` sent before Redis stalled and run after went by idle times that
        include the stall: what it claimed is not run but left pending (its idle time starts
        again), reclaimed later if its owner is really gone, acked by its owner otherwise."""
        late = time.monotonic() - started > expected + self._slow
        if late:
            self.seen()
        return late

    def timed(self, call: Callable[..., T], *args: Any, expected: float = 0.0) -> T:
        """``call(*args)``; a Redis failure, or a call held up ``slow`` seconds past
        ``expected``, counts as an outage."""
        started = time.monotonic()
        try:
            result = call(*args)
        except RPCException:
            self.seen()
            raise
        self.held_up(started, expected)
        return result

    def trusted(self) -> bool:
        """Whether idle times reported by Redis can be trusted: not within ``claim_idle`` of an
        outage. During one no consumer can refresh its in-flight entries, so they all look
        idle; by ``claim_idle`` after it every live consumer has refreshed them again (they
        retry at least every ``claim_interval / 2``), so only a dead consumer's stay idle."""
        return time.monotonic() >= self._distrust_until

    def report(self, exc: Exception, backoff: float) -> None:
        """Log a failed Redis call (and count it as an outage)."""
        self.seen()
        now = time.monotonic()
        with self._lock:
            loud = now >= self._quiet_until
            if loud:
                self._quiet_until = now + 5.0
        logger.log(
            logging.WARNING if loud else logging.DEBUG,
            "Redis unavailable (%s); retrying in %.1fs",
            exc,
            backoff,
        )


def _check_backlog(server: RPCServer) -> None:
    """Report the group's backlog (metrics) and warn when it nears ``stream_maxlen``."""
    pending, lag = server.io.backlog(server.stream, server.group)
    metrics.emit("server_backlog", stream=server.stream, group=server.group, pending=pending, unread=lag)
    if pending + max(lag, 0) > server.config.stream_maxlen // 2:
        logger.warning(
            "Stream %s backlog is %d pending + %d unread of stream_maxlen=%d: entries may be trimmed "
            "before they are processed",
            server.stream,
            pending,
            lag,
            server.config.stream_maxlen,
        )
