"""How much the raw floor and ``.call()`` depend on which CPUs the processes run on.

    python -m benchmarks.placement                 # 2000 calls x 3 rounds, ~2 min
    python -m benchmarks.placement --calls 500 --rounds 1

On a small VM the scheduler decides whether a client and its server share a CPU, and it sticks
to that choice for a while: the raw LPUSH/BLPOP floor of ``make bench`` was seen at ~0.11 ms in
one run and ~0.22 ms in the next. This measures the ``raw``, ``scripts-floor`` and ``call``
paths of ``make bench`` (same workers, same client code) under explicit placements, interleaved
round by round:

* ``free``: no pinning (what ``make bench`` does);
* ``split``: the client on the first CPU, every server process and thread on the others;
* ``same``: the client and the servers all on the first CPU.

Redis itself is never pinned (it is the machine's service). Needs at least 2 CPUs, an empty
Redis DB (default 14, ``--redis-url``), and prints a table of p50 latencies and ratios; the
numbers go to ``benchmarks/results/placement-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import redis

from benchmarks.common import DEFAULT_REDIS_URL, claim_db, percentile, redis_db, release_db
from benchmarks.groups import worker_command
from benchmarks.procs import Worker
from benchmarks.run import RESULTS_DIR, ROOT

PATHS = ("raw", "scripts-floor", "call")
#: Server process of each path (``benchmarks.groups.worker_command`` kinds).
SERVER_OF = {"raw": "raw", "scripts-floor": "scripts-floor", "call": "rpc"}


def session_tasks(session_id: int) -> list[int]:
    """Every thread (task id) of every process in the session ``session_id``."""
    tids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # Fields after the command name (which may contain spaces): state ppid pgrp session.
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[3]) != session_id:
                continue
            tids.extend(int(t) for t in os.listdir(f"/proc/{entry}/task"))
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return tids


def pin(worker: Worker, cpus: set[int]) -> None:
    """Restrict every thread of ``worker``'s process tree to ``cpus``."""
    for tid in session_tasks(worker.session_id):
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def placements(cpus: list[int]) -> dict[str, tuple[set[int], set[int]]]:
    """``name -> (client CPUs, server CPUs)``."""
    everything, first = set(cpus), {cpus[0]}
    return {"free": (everything, everything), "split": (first, everything - first), "same": (first, first)}


def start_workers(
    workers: dict[str, Worker],
    kinds: dict[str, str],
    *,
    threads: int,
    lifetime: float,
    tag: str,
    env: dict[str, str],
    logdir: str,
) -> None:
    """Start a worker per ``name -> worker kind`` (``benchmarks.groups.worker_command``) into
    ``workers`` as it goes (so that a failure half-way leaves the started ones to stop), each
    logging to ``<logdir>/<kind>-<tag>.log``."""
    for name, kind in kinds.items():
        cmd, extra = worker_command(kind, threads, lifetime, tag)
        workers[name] = Worker(
            kind,
            cmd,
            env={**env, **extra},
            cwd=str(ROOT),
            log_path=os.path.join(logdir, f"{kind}-{tag}.log"),
            lifetime=lifetime,
        )


def shut_down(paths: Any, workers: Any) -> None:
    """Close the client paths (reporting, not raising, a failure) and their Redis pools, then
    stop the workers."""
    for path in paths:
        try:
            path.close()
        except Exception as exc:  # keep cleaning up
            print(f"closing {path.name}: {exc}", file=sys.stderr)
    close_clients(paths)
    for worker in workers:
        worker.stop()


def wait_answering(path: Any, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            path.probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def timed(path: Any, n: int) -> list[float]:
    out: list[float] = []
    one, clock = path.one, time.perf_counter
    for _ in range(n):
        t0 = clock()
        one()
        out.append((clock() - t0) * 1000.0)
    return out


def close_clients(paths: Any) -> None:
    """Disconnect the Redis pools the client paths opened in this process (brokers, replies;
    Dramatiq's ``RedisBroker.close()`` keeps its pool), so that the DB counts as unused again
    and is flushed at the end."""
    from rpc_tasks.actor import find_replies_middleware

    for path in paths:
        broker = getattr(path, "broker", None) or getattr(path, "b", None)
        client = getattr(path, "r", None)
        if client is not None:
            client.connection_pool.disconnect()
        if broker is None:
            continue
        pools = [broker.client.connection_pool]
        try:
            pools.append(find_replies_middleware(broker).channel.client.connection_pool)
        except Exception:
            pass  # not an rpc-tasks broker
        for pool in pools:
            pool.disconnect()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per path, placement and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all placements (medians reported)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed calls per path after each re-pinning"
    )
    parser.add_argument("--threads", type=int, default=4, help="worker threads of the call worker")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("needs at least 2 CPUs", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    own_name = f"rpc-tasks-bench-{tag}"
    db = redis_db(args.redis_url)
    r = redis.Redis.from_url(args.redis_url, socket_timeout=10, client_name=own_name)
    problem = claim_db(r, db, own_name, tag)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # The client paths run in this process and read these, as benchmarks.client does.
    os.environ.update({"BENCH_REDIS_URL": args.redis_url, "BENCH_TAG": tag})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    from benchmarks.client import PATHS as CLIENT_PATHS

    logdir = tempfile.mkdtemp(prefix=f"bench-placement-{tag}-")
    lifetime = 120 + args.rounds * len(PATHS) * 3 * (args.calls + args.warmup) * 0.005
    workers: dict[str, Worker] = {}
    paths: dict[str, Any] = {}
    samples: dict[str, dict[str, list[float]]] = {p: {name: [] for name in PATHS} for p in placements(cpus)}
    try:
        start_workers(
            workers,
            {name: SERVER_OF[name] for name in PATHS},
            threads=args.threads,
            lifetime=lifetime,
            tag=tag,
            env=env,
            logdir=logdir,
        )
        for name in PATHS:
            path = paths[name] = CLIENT_PATHS[name]()  # closed at the end even if it fails here
            path.setup()
            wait_answering(path)
        print(f"CPUs {cpus}; {args.calls} calls x {args.rounds} round(s) per path and placement", flush=True)
        for round_no in range(1, args.rounds + 1):
            for placement, (client_cpus, server_cpus) in placements(cpus).items():
                os.sched_setaffinity(0, client_cpus)
                for worker in workers.values():
                    pin(worker, server_cpus)
                for name in PATHS:
                    timed(paths[name], args.warmup)
                    p50 = percentile(timed(paths[name], args.calls), 50)
                    samples[placement][name].append(p50)
                    print(f"  round {round_no} {placement:5s} {name:13s} p50 {p50:.3f} ms", flush=True)
    finally:
        os.sched_setaffinity(0, set(cpus))
        shut_down(list(paths.values()), workers.values())
        try:
            note = release_db(r, db, own_name, tag)
        except redis.RedisError as exc:
            note = f"could not flush Redis DB {db}: {exc}"
        if note:
            print(note, file=sys.stderr)

    table: dict[str, dict[str, float]] = {}
    print()
    print(
        f"{'placement':9s}  {'raw ms':>7s}  {'scripts ms':>10s}  {'call ms':>7s}  "
        f"{'call/raw':>8s}  {'call/scripts':>12s}"
    )
    for placement, by_path in samples.items():
        med = {name: statistics.median(values) for name, values in by_path.items()}
        table[placement] = med
        print(
            f"{placement:9s}  {med['raw']:7.3f}  {med['scripts-floor']:10.3f}  {med['call']:7.3f}  "
            f"{med['call'] / med['raw']:7.2f}x  {med['call'] / med['scripts-floor']:11.2f}x"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join(args.out_dir, f"placement-{stamp}.json")
    with open(out, "w") as f:
        json.dump({"cpus": cpus, "calls": args.calls, "rounds": samples, "median_p50_ms": table}, f, indent=2)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
