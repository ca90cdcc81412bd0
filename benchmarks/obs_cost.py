"""What tracing and metrics cost a ``.call()``, measured with fresh, pinned workers per round.

    python -m benchmarks.obs_cost                       # make bench-obs: 8 rounds, ~10 min
    python -m benchmarks.obs_cost --rounds 3 --calls 1000 --paths call-metrics

``make bench`` measures the observability paths too, but each path has its own worker process
for the whole invocation, and where a process and its memory land moves its latency for its
whole life: two identical baseline workers differed by 0.965-1.068x from one round to the next
here, all pinned to one CPU (fixing ``PYTHONHASHSEED`` did not help). The goals of the
observability issue are a few per cent, so this runs rounds instead. Each round:

* starts a fresh worker for the baseline (``obs-base``) and for each path;
* pins them, with this client and the private Redis server this starts (``--placement same``,
  the default: everything on the first CPU, so that a call's latency is close to the CPU it
  costs and nothing depends on where the scheduler puts whom; ``split``: this client on the
  first CPU, Redis and the workers on the others; ``free``: no pinning, what ``make bench``
  does, against the machine's Redis unless ``--redis-url`` is given);
* runs ``--runs`` timed runs per path, interleaved in an order that turns every run, and takes
  each path's ratio to the baseline (median of the runs' p50s);
* stops every worker.

The result is the median of the rounds' ratios, with a 95 % bootstrap interval and the range.
Same worker app, client code and enabling as ``make bench`` (``benchmarks.client``). It also
prints the CPU each side spent per call (this client, the worker, Redis), which says where a
cost goes. The numbers go to ``benchmarks/results/obs-cost-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import redis

from benchmarks.common import (
    DEFAULT_REDIS_URL,
    claim_db,
    free_port,
    percentile,
    redis_db,
    release_db,
    session_cpu_ns,
)
from benchmarks.groups import WORKER_OF
from benchmarks.placement import pin, placements, shut_down, start_workers, wait_answering
from benchmarks.procs import Worker
from benchmarks.run import RESULTS_DIR, ROOT

BASE = "obs-base"
OBS_PATHS = ("call-otel-api", "call-otel-sdk", "call-metrics", "call-metrics-ours")
#: Resamples of the bootstrap interval of a median ratio.
BOOTSTRAP = 4000
#: The issue's goals (p50 ratio to the baseline).
GOALS = {"call-otel-api": 1.03, "call-otel-sdk": 1.25, "call-metrics": 1.05, "call-metrics-ours": 1.05}


class _NoBar:
    def update(self, n: int) -> None:
        pass


def timed_run(
    path: Any, n: int, worker: Worker, redis_server: Worker | None
) -> tuple[float, dict[str, float]]:
    """A run's p50 (ms), and the CPU each side spent per call (µs): this client process, the
    path's worker (its whole session) and the private Redis server."""
    sessions = {"worker": worker, **({"redis": redis_server} if redis_server else {})}
    before = {side: session_cpu_ns(w.session_id) for side, w in sessions.items()}
    client_before = time.process_time_ns()
    p50 = percentile(path.run(n, _NoBar())["latencies_ms"], 50)
    cpu = {"client": (time.process_time_ns() - client_before) / n / 1000.0}
    for side, w in sessions.items():
        cpu[side] = (session_cpu_ns(w.session_id) - before[side]) / n / 1000.0
    return p50, cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8, help="rounds, each with fresh workers")
    parser.add_argument("--runs", type=int, default=4, help="timed runs per path and round")
    parser.add_argument("--calls", type=int, default=1500, help="calls per timed run")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls per path and round")
    parser.add_argument("--threads", type=int, default=4, help="worker threads")
    parser.add_argument("--paths", default=",".join(OBS_PATHS), help="comma-separated paths")
    parser.add_argument("--placement", choices=("same", "split", "free"), default="same")
    parser.add_argument(
        "--redis-url", help="a Redis DB to use instead of a private server (default for --placement free)"
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in args.paths if p not in OBS_PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(OBS_PATHS)}")
    return args


def start_redis(logdir: str, lifetime: float) -> tuple[Worker, str]:
    """A private, memory-only ``redis-server`` on a free loopback port, and its URL."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = Worker(
        "redis",
        cmd,
        env=dict(os.environ),
        cwd=logdir,
        log_path=os.path.join(logdir, "redis.log"),
        lifetime=lifetime,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return server, url
        except redis.RedisError:
            if time.monotonic() > deadline or not server.alive():
                server.stop()
                raise RuntimeError(f"redis-server did not start: {server.log_tail()}") from None
            time.sleep(0.1)


def run_round(
    args: argparse.Namespace,
    tag: str,
    env: dict[str, str],
    logdir: str,
    round_no: int,
    redis_server: Worker | None,
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """One round with fresh workers: ``path -> p50 of each timed run`` (ms), and ``path -> CPU
    per call of each run`` (µs, by side)."""
    from benchmarks.client import PATHS as CLIENT_PATHS

    names = [BASE, *args.paths]
    lifetime = 120 + len(names) * (args.runs * args.calls + args.warmup) * 0.005
    cpus = sorted(os.sched_getaffinity(0))
    client_cpus, server_cpus = placements(cpus)[args.placement]
    workers: dict[str, Worker] = {}
    paths: dict[str, Any] = {}
    p50s: dict[str, list[float]] = {name: [] for name in names}
    cpus_us: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        start_workers(
            workers,
            {name: WORKER_OF[name] for name in names},
            threads=args.threads,
            lifetime=lifetime,
            tag=f"{tag}-{round_no}",
            env=env,
            logdir=logdir,
        )
        for name in names:
            path = paths[name] = CLIENT_PATHS[name]()
            path.setup()
            wait_answering(path)
        os.sched_setaffinity(0, client_cpus)
        for worker in [*workers.values(), *filter(None, [redis_server])]:
            pin(worker, server_cpus)
        for name in names:
            paths[name].run(args.warmup, _NoBar())
        for run_no in range(args.runs):
            shift = (run_no + round_no) % len(names)
            for name in names[shift:] + names[:shift]:
                p50, cpu = timed_run(paths[name], args.calls, workers[name], redis_server)
                p50s[name].append(p50)
                cpus_us[name].append(cpu)
    finally:
        os.sched_setaffinity(0, set(cpus))
        shut_down(list(paths.values()), workers.values())
    return p50s, cpus_us


def summarize(rounds: list[dict[str, list[float]]], paths: list[str]) -> dict[str, dict[str, float]]:
    """Per path: the median, lowest and highest of the rounds' ratios to the baseline, and a 95 %
    bootstrap interval of that median (resampling rounds; seeded, so the same rounds give the
    same interval)."""
    rng = random.Random(0)
    out: dict[str, dict[str, float]] = {}
    for name in paths:
        ratios = [statistics.median(r[name]) / statistics.median(r[BASE]) for r in rounds]
        medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(BOOTSTRAP))
        out[name] = {
            "median": statistics.median(ratios),
            "low": min(ratios),
            "high": max(ratios),
            "ci_low": medians[int(BOOTSTRAP * 0.025)],
            "ci_high": medians[int(BOOTSTRAP * 0.975) - 1],
        }
    return out


def cpu_per_call(
    cpu_rounds: list[dict[str, list[dict[str, float]]]], names: list[str]
) -> dict[str, dict[str, float]]:
    """Per path and side: the median CPU per call over every run of every round (µs)."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        runs = [run for r in cpu_rounds for run in r[name]]
        out[name] = {side: statistics.median(run[side] for run in runs) for side in runs[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.placement == "split" and len(os.sched_getaffinity(0)) < 2:
        print("--placement split needs at least 2 CPUs", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    own_name = f"rpc-tasks-bench-{tag}"
    logdir = tempfile.mkdtemp(prefix=f"bench-obs-{tag}-")
    redis_server: Worker | None = None
    url = args.redis_url or (DEFAULT_REDIS_URL if args.placement == "free" else "")
    if not url:
        if not shutil.which("redis-server"):
            print("needs redis-server on PATH (or --redis-url)", file=sys.stderr)
            return 2
        redis_server, url = start_redis(logdir, lifetime=3600.0 * 4)
    try:
        return _measure(args, tag, own_name, url, logdir, redis_server)
    finally:
        if redis_server is not None:
            redis_server.stop()


def _measure(
    args: argparse.Namespace, tag: str, own_name: str, url: str, logdir: str, redis_server: Worker | None
) -> int:
    db = redis_db(url)
    r = redis.Redis.from_url(url, socket_timeout=10, client_name=own_name)
    problem = claim_db(r, db, own_name, tag)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    os.environ.update({"BENCH_REDIS_URL": url, "BENCH_TAG": tag})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    rounds: list[dict[str, list[float]]] = []
    cpu_rounds: list[dict[str, list[dict[str, float]]]] = []
    print(
        f"{args.rounds} rounds x {args.runs} runs x {args.calls} calls per path, placement "
        f"{args.placement}, fresh workers per round",
        flush=True,
    )
    try:
        for round_no in range(1, args.rounds + 1):
            p50s, cpu = run_round(args, tag, env, logdir, round_no, redis_server)
            rounds.append(p50s)
            cpu_rounds.append(cpu)
            base = statistics.median(p50s[BASE])
            ratios = "  ".join(f"{n} {statistics.median(p50s[n]) / base:.3f}x" for n in args.paths)
            print(f"  round {round_no}: {BASE} p50 {base:.3f} ms  {ratios}", flush=True)
    finally:
        try:
            note = release_db(r, db, own_name, tag)
        except redis.RedisError as exc:
            note = f"could not flush Redis DB {db}: {exc}"
        if note:
            print(note, file=sys.stderr)
    if not rounds:
        return 1
    table = summarize(rounds, args.paths)
    print(f"\n{'path':18s}  {'median':>7s}  {'95% interval':>13s}  {'range':>13s}  goal")
    for name, row in table.items():
        verdict = "met" if row["median"] <= GOALS[name] else "NOT met"
        print(
            f"{name:18s}  {row['median']:6.3f}x  {row['ci_low']:.3f}-{row['ci_high']:.3f}x  "
            f"{row['low']:.3f}-{row['high']:.3f}x  <= {GOALS[name]:.2f}x {verdict}"
        )
    cpu_table = cpu_per_call(cpu_rounds, [BASE, *args.paths])
    sides = list(next(iter(cpu_table.values())))
    print(f"\nCPU per call (µs, median over runs): {'  '.join(f'{s:>7s}' for s in sides)}")
    for name, row in cpu_table.items():
        print(f"  {name:18s}  " + "  ".join(f"{row[s]:7.1f}" for s in sides))
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join(args.out_dir, f"obs-cost-{stamp}.json")
    with open(out, "w") as f:
        json.dump(
            {"args": vars(args), "rounds_p50_ms": rounds, "ratios": table, "cpu_us_per_call": cpu_table},
            f,
            indent=2,
        )
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
