"""Metric updates queued where they happen and applied to ``prometheus_client`` off the hot path.

Why not call ``inc()``/``observe()`` in place (measured with ``python -m benchmarks.obs_cost``:
one CPU, fresh workers per round, 6 rounds): in place, the caller's in-flight gauge and latency
histogram cost a ``.call()`` 3.7 % of its p50 (three locked updates of cold code, about 17 µs of
CPU), and the worker's per-message series (Dramatiq's, written to its multi-process files, and
ours) another 3.9 % (about 27 µs). Queueing an update is one ``deque.append`` (about 0.1 µs);
:class:`DeferredUpdates` folds what is queued into one ``inc()`` per series child and one bulk
update per histogram child, from a daemon thread every :data:`FLUSH_INTERVAL` seconds, at a
scrape through rpc-tasks' own exposition (:func:`~rpc_tasks.observability.metrics_text`,
:func:`~rpc_tasks.observability.start_metrics_server`, the in-process default registry), when a
worker shuts down and when the process exits. Values reach Dramatiq's exposition server (another
process) at most that interval late.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import logging
import os
import threading
from collections.abc import Iterable
from multiprocessing import util as mp_util
from typing import Any

__all__ = ["FLUSH_INTERVAL", "DeferredUpdates", "FlushOnCollect", "updates"]

logger = logging.getLogger(__name__)

#: Seconds between two flushes of the queued updates.
FLUSH_INTERVAL = 1.0
_INC, _OBSERVE = 0, 1


class DeferredUpdates:
    """A queue of ``inc`` and ``observe`` updates of ``prometheus_client`` series children."""

    def __init__(self, interval: float = FLUSH_INTERVAL) -> None:
        self.interval = interval
        self._queue: collections.deque[tuple[Any, int, float]] = collections.deque()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._stop = threading.Event()
        self._held_for_fork = False
        # No fork in the middle of a flush: the child would inherit prometheus_client's value
        # locks held by the flushing thread, and block at its first update.
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork_in_parent,
            after_in_child=self._after_fork,
        )
        atexit.register(self.flush)
        # A multiprocessing child ends with os._exit (no atexit): flush from its exit function.
        mp_util.register_after_fork(self, DeferredUpdates._in_multiprocessing_child)

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """Queue ``child.inc(amount)`` (a counter's or a gauge's; a gauge takes negative amounts)."""
        self._queue.append((child, _INC, amount))
        if self._thread is None:
            self._start()

    def observe(self, child: Any, value: float) -> None:
        """Queue ``child.observe(value)`` (a histogram's)."""
        self._queue.append((child, _OBSERVE, value))
        if self._thread is None:
            self._start()

    def flush(self) -> None:
        """Apply every queued update now (thread-safe; flushes run one at a time)."""
        with self._flushing:
            totals: dict[int, list[Any]] = {}
            observed: dict[int, tuple[Any, list[float]]] = {}
            take = self._queue.popleft
            while True:
                try:
                    child, op, value = take()
                except IndexError:
                    break
                if op == _INC:
                    entry = totals.get(id(child))
                    if entry is None:
                        totals[id(child)] = [child, value]
                    else:
                        entry[1] += value
                else:
                    found = observed.get(id(child))
                    if found is None:
                        observed[id(child)] = (child, [value])
                    else:
                        found[1].append(value)
            failed: Exception | None = None
            for child, total in totals.values():
                if total:
                    try:
                        child.inc(total)
                    except Exception as exc:  # one broken series must not lose the others' updates
                        failed = exc
            for child, values in observed.values():
                try:
                    observe_all(child, values)
                except Exception as exc:
                    failed = exc
            if failed is not None:
                logger.error("applying queued metric updates failed", exc_info=failed)

    def _start(self) -> None:
        with self._starting:
            if self._thread is None:
                self._stop.clear()
                thread = threading.Thread(target=self._run, name="rpc-tasks-metrics-flush", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # a broken series must not stop the others' updates
                logger.exception("applying queued metric updates failed")

    def _in_multiprocessing_child(self) -> None:
        mp_util.Finalize(self, self.flush, exitpriority=0)

    def _before_fork(self) -> None:
        # Bounded: a fork from a signal handler that interrupted this thread's own flush must not hang.
        self._held_for_fork = self._flushing.acquire(timeout=5)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._flushing.release()

    def _after_fork(self) -> None:
        # The child has no flusher thread, and the parent's queued updates are the parent's.
        self._queue.clear()
        self._held_for_fork = False
        self._flushing = threading.Lock()
        self._starting = threading.Lock()
        self._stop = threading.Event()
        self._thread = None


def observe_all(child: Any, values: list[float]) -> None:
    """``child.observe(v)`` for every value, as one update per bucket that got any.

    Uses the histogram child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (stable since
    prometheus_client's first releases; ``tests/unit/test_metrics_deferred.py`` checks the result
    against ``observe()``); without them it falls back to ``observe()`` per value."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            child.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:  # observe() puts a value in the first bucket whose bound is >= it
        i = bisect.bisect_left(bounds, value)
        if i < len(bounds) and value <= bounds[i]:  # NaN: in none, as observe() does
            counts[i] += 1
    total.inc(sum(values))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class FlushOnCollect:
    """A collector that flushes :data:`updates` when a registry is collected and yields
    nothing: registered first, it lets the series collected after it show every update."""

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        updates.flush()
        return []


#: The process's queue (its flusher thread starts with the first update).
updates = DeferredUpdates()
