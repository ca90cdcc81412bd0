"""Queued metric updates (rpc_tasks.observability.deferred): the same values as updating in
place, applied by the flusher thread, at a collect, and never twice."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rpc_tasks.observability.deferred import DeferredUpdates, FlushOnCollect, observe_all, updates

prom = pytest.importorskip("prometheus_client")

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.5, 1.0)


def samples(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()  # type: ignore[attr-defined]
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_bulk_observe_gives_what_observe_gives() -> None:
    rng = random.Random(7)
    values = [rng.choice([0.0, 0.0005, 0.001, 1.0, 2.0, 1e9]) for _ in range(50)]
    values += [rng.uniform(0, 1.2) for _ in range(500)]
    in_place, bulk = prom.CollectorRegistry(), prom.CollectorRegistry()
    one = prom.Histogram("h", "h", ["a"], buckets=BUCKETS, registry=in_place).labels("x")
    for v in values:
        one.observe(v)
    observe_all(prom.Histogram("h", "h", ["a"], buckets=BUCKETS, registry=bulk).labels("x"), values)
    assert samples(bulk) == pytest.approx(samples(in_place))
    assert samples(bulk)[("h_count", (("a", "x"),))] == 550


def test_bulk_observe_falls_back_to_observe_without_the_private_fields() -> None:
    seen: list[float] = []

    class Foreign:
        def observe(self, value: float) -> None:
            seen.append(value)

    observe_all(Foreign(), [1.0, 2.0])
    assert seen == [1.0, 2.0]


def test_queued_updates_fold_into_one_update_per_child() -> None:
    registry = prom.CollectorRegistry()
    gauge = prom.Gauge("g", "g", registry=registry)
    counter = prom.Counter("c", "c", registry=registry)
    calls: list[float] = []
    real_inc = counter.inc
    counter.inc = lambda amount=1.0: (calls.append(amount), real_inc(amount))[1]  # type: ignore[method-assign]
    q = DeferredUpdates(interval=3600)
    for _ in range(5):
        q.inc(gauge)
        q.inc(counter)
    q.inc(gauge, -3)
    assert gauge._value.get() == 0 and counter._value.get() == 0  # nothing applied yet
    q.flush()
    assert gauge._value.get() == 2 and counter._value.get() == 5 and calls == [5]
    q.flush()  # applied once
    assert counter._value.get() == 5


def test_the_flusher_thread_applies_updates_within_its_interval() -> None:
    registry = prom.CollectorRegistry()
    counter = prom.Counter("c", "c", registry=registry)
    q = DeferredUpdates(interval=0.05)
    q.inc(counter, 2)
    deadline = time.monotonic() + 5
    while counter._value.get() != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter._value.get() == 2


def test_a_collect_applies_the_queued_updates_first() -> None:
    registry = prom.CollectorRegistry()
    registry.register(FlushOnCollect())
    counter = prom.Counter("c", "c", registry=registry)
    updates.inc(counter, 3)
    assert registry.get_sample_value("c_total") == 3


def test_bulk_observe_of_nan_counts_it_in_no_bucket_as_observe_does() -> None:
    in_place, bulk = prom.CollectorRegistry(), prom.CollectorRegistry()
    prom.Histogram("h", "h", buckets=BUCKETS, registry=in_place).observe(float("nan"))
    observe_all(prom.Histogram("h", "h", buckets=BUCKETS, registry=bulk), [float("nan")])
    assert in_place.get_sample_value("h_count") == bulk.get_sample_value("h_count") == 0


def test_a_failing_series_does_not_lose_the_other_queued_updates() -> None:
    registry = prom.CollectorRegistry()
    counter = prom.Counter("c", "c", registry=registry)

    class Broken:
        def inc(self, amount: float) -> None:
            raise OSError("no space left on device")

    q = DeferredUpdates(interval=3600)
    q.inc(Broken())
    q.inc(counter, 5)
    q.flush()  # logged, not raised: a scrape that flushes first must not fail for it
    assert counter._value.get() == 5


def test_a_multiprocessing_child_applies_its_updates_when_it_ends(tmp_path: Path) -> None:
    # A multiprocessing (fork) child ends with os._exit: no atexit; its updates must still land.
    script = (
        "import multiprocessing, prometheus_client as prom\n"
        "from rpc_tasks.observability.deferred import updates\n"
        "c = prom.Counter('c', 'c', registry=prom.CollectorRegistry())\n"
        "def child():\n"
        "    updates.inc(c, 5)\n"
        "p = multiprocessing.get_context('fork').Process(target=child)\n"
        "p.start(); p.join()\n"
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = prom.CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert registry.get_sample_value("c_total") == 5


def test_a_fork_waits_for_a_flush_in_progress() -> None:
    # prometheus_client's value locks (one per process in multi-process mode) are held while a
    # flush applies updates; a fork in that window would give the child a lock nobody releases.
    held = threading.Lock()

    class Slow:
        def inc(self, amount: float) -> None:
            with held:
                time.sleep(0.3)

    q = DeferredUpdates(interval=3600)
    q.inc(Slow())
    flusher = threading.Thread(target=q.flush)
    flusher.start()
    time.sleep(0.1)  # the flush is inside Slow.inc
    pid = os.fork()
    if pid == 0:
        os._exit(0 if held.acquire(timeout=2) else 1)
    _, status = os.waitpid(pid, 0)
    flusher.join()
    assert os.waitstatus_to_exitcode(status) == 0
