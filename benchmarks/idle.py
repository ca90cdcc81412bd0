"""What the workers, the machine and Redis do while nobody calls: a worker's idle CPU and Redis
commands (:func:`measure_idle`), and whether other work disturbs a group's numbers
(:func:`environment`, :func:`quiet_environment`, :func:`is_busy`). Used by :mod:`benchmarks.run`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from benchmarks.common import (
    CLK_TCK,
    busy_between,
    commands_delta,
    commandstats,
    cpu_busy_pct,
    cpu_sample,
    session_cpu_ns,
    session_cpu_ticks,
)
from benchmarks.procs import Worker


def measure_idle(
    worker: Worker, r: redis.Redis, seconds: float, others: Sequence[Worker] = ()
) -> dict[str, Any]:
    """CPU of the worker's whole process tree (``/proc/<pid>/stat``: utime + stime + cutime +
    cstime, summed over its session) and Redis commands (server-wide) while nobody calls. The
    ``others`` (the group's other workers) are paused (SIGSTOP) meanwhile, so that the Redis
    commands counted are this worker's own."""
    for other in others:
        other.pause()
    if others:
        # A paused worker's last blocking read (up to 1 s) still ends on the server, which
        # then runs the commands pipelined behind it: let that happen before counting.
        time.sleep(1.5)
    try:
        return _measure_idle(worker, r, seconds)
    finally:
        for other in others:
            other.resume()


def _measure_idle(worker: Worker, r: redis.Redis, seconds: float) -> dict[str, Any]:
    time.sleep(0.5)
    before_cmds = commandstats(r)
    machine0 = cpu_sample()
    ticks0, pids = session_cpu_ticks(worker.session_id)
    ns0 = session_cpu_ns(worker.session_id)
    t0 = time.monotonic()
    time.sleep(seconds)
    ticks1, _ = session_cpu_ticks(worker.session_id)
    ns1 = session_cpu_ns(worker.session_id)
    t1 = time.monotonic()
    machine1 = cpu_sample()
    after_cmds = commandstats(r)
    delta = commands_delta(before_cmds, after_cmds)
    elapsed = t1 - t0
    return {
        "seconds": round(elapsed, 3),
        "processes": len(pids),
        "cpu_pct": (ticks1 - ticks0) / CLK_TCK / elapsed * 100.0,
        "cpu_resolution_pct": 100.0 / CLK_TCK / elapsed,
        "cpu_pct_schedstat": (ns1 - ns0) / 1e9 / elapsed * 100.0,
        "redis_cmds_per_s": sum(delta.values()) / elapsed,
        "redis_cmds": delta,
        "machine_cpu_busy_pct": busy_between(machine0, machine1),
    }


def environment(r: redis.Redis, seconds: float = 0.5) -> dict[str, float]:
    """What else is going on, with none of our processes running: Redis commands/s from other
    clients (server-wide) and machine-wide CPU busy % (all cores = 100)."""
    before = commandstats(r)
    busy = cpu_busy_pct(seconds)
    delta = commands_delta(before, commandstats(r))
    return {"redis_cmds_per_s": sum(delta.values()) / seconds, "cpu_busy_pct": busy}


#: Above these, a group's numbers are flagged as disturbed by other work on the machine.
BUSY_REDIS_CMDS_PER_S = 50.0
BUSY_CPU_PCT = 20.0
#: Workers whose own idle polling sends more than BUSY_REDIS_CMDS_PER_S (arq with a 1 ms
#: ``poll_delay``: ~900 commands/s): their idle window says nothing about other clients.
POLLING_WORKERS = frozenset({"arq-fast"})


def is_busy(seen: dict[str, float]) -> bool:
    return seen["redis_cmds_per_s"] > BUSY_REDIS_CMDS_PER_S or seen["cpu_busy_pct"] > BUSY_CPU_PCT


def quiet_environment(r: redis.Redis, max_wait: float) -> dict[str, float]:
    """:func:`environment`, waiting up to ``max_wait`` s for other work to stop."""
    deadline = time.monotonic() + max_wait
    seen = environment(r)
    if is_busy(seen) and max_wait > 0:
        print(f"  waiting up to {max_wait:.0f}s for the machine and Redis to be quiet...", flush=True)
        while is_busy(seen) and time.monotonic() < deadline:
            time.sleep(1.0)
            seen = environment(r)
    return seen
