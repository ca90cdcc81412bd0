"""Async paths of the benchmark (client side): ``acall``, ``acall-1k``, ``acall-10k``.

All run against the ``call`` worker (``BlockingRedisBroker``, 1 process, 4 threads) in the
``rpc`` group, interleaved with ``call`` and ``inflight``:

* ``acall``: ``await echo.acall(params)``, sequential, one event loop (per-call latency, to
  compare with ``call``'s p50 in the same run; goal <= 1.15x);
* ``acall-1k``: 1,000 coroutines each awaiting ``acall`` in a loop (1,000 calls in flight all
  the time; at least 8,000 calls per run) while a probe measures the loop's lag
  (``asyncio.sleep(0.001)`` overshoot every 10 ms; goal: under 5 ms);
* ``acall-10k``: ``--concurrency`` (10,000) ``acall``s started at once and gathered, per run:
  calls/s (goal >= ``inflight``, the sync ``call_many``), the peak number of TCP connections to
  Redis the calls opened (this process's, sampled every 50 ms from ``/proc``, minus those open
  before the run, after closing the loop's async connections; goal <= 4), the client's CPU time
  per call, RSS growth (goal < 20 MB, see below) and the loop lag.

RSS growth of ``acall-10k``: the peak RSS of a run minus the RSS after the path's warm-up, a
burst of :attr:`Acall10kPath.warmup_concurrency` calls (imports, connections, caches), measured
once. So every run counts all the memory 10,000 pending calls make the process hold, including
what earlier runs grew and kept (CPython rarely gives freed memory back): what a service
running such bursts keeps. (Until 2026-11 the warm-up was itself a 10,000-call burst and each
run was measured from its own start, so the timed runs reused the heap the warm-up had grown
and reported a fraction of it: 19 -> 16 -> 12 MB over three runs where a fresh process grows
36 MB. ``rss_run_growth_mb`` still gives that figure, peak minus the run's start.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import MESSAGE, percentile
from benchmarks.paths import CALL_TIMEOUT, Path
from benchmarks.rpc_paths import CallPath


class _Loop(CallPath):
    """A ``CallPath`` whose calls run on one event loop kept for the whole path."""

    def setup(self) -> None:
        super().setup()
        self.loop = asyncio.new_event_loop()

    def probe(self) -> None:
        self.loop.run_until_complete(self.actor.acall(self.params, timeout=1.0))

    def one(self) -> None:
        result = self.loop.run_until_complete(self.actor.acall(self.params, timeout=CALL_TIMEOUT))
        if result.message != MESSAGE:
            raise AssertionError(f"bad echo {result!r}")

    def close(self) -> None:
        from rpc_tasks import aclose_loop_connections

        self.loop.run_until_complete(aclose_loop_connections())
        self.loop.close()


class AcallPath(_Loop):
    """``await echo.acall(params)``, one call at a time, timed inside the loop."""

    name = "acall"

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return dict(self.loop.run_until_complete(self._run(n, bar)))

    async def _run(self, n: int, bar: Any) -> dict[str, Any]:
        acall, params = self.actor.acall, self.params
        clock = time.perf_counter
        latencies: list[float] = []
        started = clock()
        for _ in range(n):
            t0 = clock()
            result = await acall(params, timeout=CALL_TIMEOUT)
            latencies.append((clock() - t0) * 1000.0)
            if result.message != MESSAGE:
                raise AssertionError(f"bad echo {result!r}")
            bar.update(1)
        return {"calls": n, "elapsed_s": clock() - started, "latencies_ms": latencies}


class Acall1kPath(_Loop):
    """1,000 calls kept in flight from one loop; loop lag measured meanwhile."""

    name = "acall-1k"
    first_call = False
    in_flight = 1000

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        # At least 8 calls per caller (~2 s here, ~200 lag samples): with 2 (until 2026-11),
        # ~45 samples, whose "p99" was their maximum, i.e. the one time the OS did not run us.
        return dict(self.loop.run_until_complete(self._run(max(n, self.in_flight * 8), bar)))

    async def _run(self, n: int, bar: Any) -> dict[str, Any]:
        left = n
        acall, params = self.actor.acall, self.params

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await acall(params, timeout=60.0)
                bar.update(1)

        idle: list[tuple[float, float]] = []
        probe = asyncio.ensure_future(lag_probe(idle))
        await asyncio.sleep(1.0)  # the same probe on an idle loop: this machine's own jitter
        probe.cancel()
        lags: list[tuple[float, float]] = []
        probe = asyncio.ensure_future(lag_probe(lags))
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(self.in_flight)))
        elapsed = time.perf_counter() - started
        probe.cancel()
        # The first lag samples cover the start of 1,000 calls at once (each builds its
        # message before the loop gets back to the probe): reported apart.
        steady = lags[5:] if len(lags) > 10 else lags
        idle_wall = [w for w, _ in idle]
        return {
            "calls": n,
            "elapsed_s": elapsed,
            "latencies_ms": [],
            **lag_stats(steady),
            "idle_loop_lag_p99_ms": percentile(idle_wall, 99) if idle_wall else float("nan"),
            "lag_start_ms": lags[:5],
        }


class Acall10kPath(_Loop):
    """``--concurrency`` acalls started at once from one loop."""

    name = "acall-10k"
    first_call = False
    concurrency = 10_000
    #: Calls at once in the warm-up (the path's first run).
    warmup_concurrency = 500
    #: RSS (MB) after the warm-up: what the RSS growth of every timed run is measured from.
    rss_baseline: float | None = None

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        if self.rss_baseline is None:  # the warm-up: small, so it does not grow the heap
            out = dict(self.loop.run_until_complete(self._run(bar, self.warmup_concurrency)))
            gc.collect()
            self.rss_baseline = rss_mb()
            return out
        return dict(self.loop.run_until_complete(self._run(bar, self.concurrency)))

    async def _run(self, bar: Any, concurrency: int) -> dict[str, Any]:
        from rpc_tasks import aclose_loop_connections

        # Start from no async connection at all: the connections counted are the ones the
        # 10,000 calls open (the process's other clients, idle in their pools, are the baseline).
        await aclose_loop_connections()
        gc.collect()
        rss_before = rss_mb()
        baseline = redis_connections()
        peak = {"conns": baseline, "rss": rss_before}
        cpu0 = time.process_time()
        lags: list[tuple[float, float]] = []
        done = asyncio.Event()

        async def sampler() -> None:
            while not done.is_set():
                peak["conns"] = max(peak["conns"], redis_connections())
                peak["rss"] = max(peak["rss"], rss_mb())
                await asyncio.sleep(0.05)

        tasks = [asyncio.ensure_future(sampler()), asyncio.ensure_future(lag_probe(lags))]
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self.actor.acall(self.params, timeout=120.0) for _ in range(concurrency))
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        done.set()
        for task in tasks:
            task.cancel()
        if len(results) != concurrency or any(r.message != MESSAGE for r in results):
            raise AssertionError("acall returned wrong results")
        bar.update(concurrency)
        del results
        return {
            "calls": concurrency,
            "elapsed_s": elapsed,
            "latencies_ms": [],
            "peak_redis_connections": peak["conns"] - baseline,
            "client_cpu_us_per_call": cpu / concurrency * 1e6,
            "rss_growth_mb": peak["rss"] - (self.rss_baseline or rss_before),
            "rss_run_growth_mb": peak["rss"] - rss_before,
            **lag_stats(lags),
        }


async def lag_probe(lags: list[tuple[float, float]], every: float = 0.01) -> None:
    """Every ``every`` s, append how late a 1 ms sleep wakes up (ms, wall clock) and how much
    CPU the loop's thread spent meanwhile (ms): the first includes the time this process was
    not scheduled at all (2 shared cores), the second only the loop's own work that delayed
    the probe."""
    loop = asyncio.get_running_loop()
    while True:
        t0, c0 = loop.time(), time.thread_time()
        await asyncio.sleep(0.001)
        wall = max(0.0, (loop.time() - t0 - 0.001) * 1000.0)
        lags.append((wall, (time.thread_time() - c0) * 1000.0))
        await asyncio.sleep(every)


def lag_stats(lags: list[tuple[float, float]]) -> dict[str, Any]:
    if not lags:
        return {}
    wall = [w for w, _ in lags]
    cpu = [c for _, c in lags]
    return {
        "loop_lag_p50_ms": percentile(wall, 50),
        "loop_lag_p99_ms": percentile(wall, 99),
        "loop_lag_max_ms": max(wall),
        "loop_work_p99_ms": percentile(cpu, 99),
        "loop_work_max_ms": max(cpu),
    }


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def redis_connections(port: int | None = None) -> int:
    """This process's established TCP connections to Redis (from ``/proc``)."""
    from urllib.parse import urlsplit

    from benchmarks.common import redis_url

    port = port or urlsplit(redis_url()).port or 6379
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                        count += 1
        except OSError:
            continue
    return count


# -- async peers ------------------------------------------------------------------------------


class AsyncPeerPath(Path):
    """Another library's async call, one at a time on an event loop of the path's own:
    subclasses set ``self.loop`` in ``setup()`` and define ``_one()`` (one checked round trip).
    Also used by :mod:`benchmarks.arq_paths`."""

    loop: asyncio.AbstractEventLoop

    async def _one(self, timeout: float) -> None:
        raise NotImplementedError

    def probe(self) -> None:
        self.loop.run_until_complete(self._one(1.0))

    def one(self) -> None:
        self.loop.run_until_complete(self._one(CALL_TIMEOUT))

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return dict(self.loop.run_until_complete(self._run(n, bar)))

    async def _run(self, n: int, bar: Any) -> dict[str, Any]:
        clock = time.perf_counter
        latencies: list[float] = []
        started = clock()
        for _ in range(n):
            t0 = clock()
            await self._one(CALL_TIMEOUT)
            latencies.append((clock() - t0) * 1000.0)
            bar.update(1)
        return {"calls": n, "elapsed_s": clock() - started, "latencies_ms": latencies}


async def burst(
    one: Callable[[], Awaitable[Any]], count: int, bar: Any, disconnect: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """``count`` calls of ``one()`` started at once and gathered: the run record, with the peak
    number of Redis connections this process opened meanwhile (sampled every 50 ms). The pools'
    connections are closed first (``disconnect()``): the ones counted are those the burst opens
    (a warm-up burst leaves its pools full)."""
    await disconnect()
    baseline = redis_connections()
    peak = {"conns": baseline}
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            peak["conns"] = max(peak["conns"], redis_connections())
            await asyncio.sleep(0.05)

    watch = asyncio.ensure_future(sampler())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one() for _ in range(count)))
    finally:
        done.set()
        watch.cancel()
    elapsed = time.perf_counter() - started
    bar.update(count)
    return {
        "calls": count,
        "elapsed_s": elapsed,
        "latencies_ms": [],
        "peak_redis_connections": peak["conns"] - baseline,
    }


class TaskiqPath(AsyncPeerPath):
    """Taskiq + taskiq-redis: ``await (await echo.kiq(x)).wait_result()`` at its default
    ``check_interval`` (0.2 s)."""

    name = "taskiq"
    check_interval = 0.2
    #: At ~0.2 s a call, warm-up and timed runs are capped at this many calls.
    max_calls: int | None = 100

    def setup(self) -> None:
        state = _taskiq_state()
        self.broker, self.echo, self.loop = state["broker"], state["echo"], state["loop"]

    async def _one(self, timeout: float) -> None:
        task = await self.echo.kiq(MESSAGE)
        result = await task.wait_result(check_interval=self.check_interval, timeout=timeout)
        if result.return_value != MESSAGE:
            raise AssertionError(f"bad echo {result!r}")

    def close(self) -> None:
        state = _taskiq_state()
        state["users"] -= 1
        if state["users"] == 0:
            self.loop.run_until_complete(self.broker.shutdown())
            self.loop.close()


#: The Taskiq broker is a module-level object bound to the loop it started on: one loop for
#: the Taskiq paths of the process.
_taskiq: dict[str, Any] = {}


def _taskiq_state() -> dict[str, Any]:
    if not _taskiq:
        from benchmarks.workers.taskiq_app import broker, echo

        loop = asyncio.new_event_loop()
        loop.run_until_complete(broker.startup())
        _taskiq.update(broker=broker, echo=echo, loop=loop, users=0)
    _taskiq["users"] += 1
    return _taskiq


class TaskiqFastPath(TaskiqPath):
    """Taskiq at its fastest: ``wait_result(check_interval=0)`` (polls the result key in a loop)."""

    name = "taskiq-fast"
    check_interval = 0.0
    max_calls = None


class Taskiq10kPath(TaskiqPath):
    """``--concurrency`` Taskiq calls at once from one loop (default ``check_interval``)."""

    name = "taskiq-10k"
    first_call = False

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        many = burst(lambda: self._one(120.0), self.count(), bar, self._disconnect)
        return dict(self.loop.run_until_complete(many))

    async def _disconnect(self) -> None:
        await self.broker.connection_pool.disconnect()
        await self.broker.result_backend.redis_pool.disconnect()

    def count(self) -> int:
        return Acall10kPath.concurrency


class Taskiq1kPath(Taskiq10kPath):
    """1,000 Taskiq calls at once (at 10,000 its pools give up; see ``workers/taskiq_app.py``)."""

    name = "taskiq-1k"

    def count(self) -> int:
        return 1000


PATHS = {
    cls.name: cls
    for cls in (
        AcallPath,
        Acall1kPath,
        Acall10kPath,
        TaskiqPath,
        TaskiqFastPath,
        Taskiq1kPath,
        Taskiq10kPath,
    )
}
