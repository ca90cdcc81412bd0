"""``make bench``: rpc-tasks against its raw Redis floors, plain Dramatiq and Celery.

    python -m benchmarks.run [--quick] [--paths raw,call,...] [--calls N] [--runs N]

Every worker is a separate process (started here, one group of paths at a time with all the
workers the group needs, each in its own session under a hard time limit; the floors share a
group with the paths measured against them), every client runs in its own process too; all use the same
local Redis and one dedicated DB (default 14; it must be empty and unused, never DB 0; flushed
at the end); ``call-rabbitmq`` also uses the local RabbitMQ (its queues are deleted at the end).
For each path: wait for the worker, warm up, several timed runs (the table shows medians over
runs), then single calls after 1.5 s of idleness; then the worker's idle CPU and the Redis
commands it sends while idle are measured over 3 s. Results go to
``benchmarks/results/<timestamp>.json`` with a latency CDF plot next to it. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks import arq_env, report
from benchmarks.common import (
    DEFAULT_RABBITMQ_URL,
    DEFAULT_REDIS_URL,
    Names,
    claim_db,
    delete_rabbitmq_queues,
    rabbitmq_check,
    redis_db,
    release_db,
)
from benchmarks.groups import ALL_PATHS, GROUPS, OPTIONAL_PACKAGES, WORKER_OF, worker_command
from benchmarks.idle import (
    BUSY_CPU_PCT,
    BUSY_REDIS_CMDS_PER_S,
    POLLING_WORKERS,
    is_busy,
    measure_idle,
    quiet_environment,
)
from benchmarks.procs import Worker, run_bounded
from benchmarks.run_report import clean_nan, json_default, redact, standard_notes, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="300 calls x 1 run (default: 2000 x 3)")
    parser.add_argument(
        "--paths", default=",".join(ALL_PATHS), help=f"comma-separated subset of {','.join(ALL_PATHS)}"
    )
    parser.add_argument("--calls", type=int, help="calls per run")
    parser.add_argument("--runs", type=int, help="timed runs per path (medians are reported)")
    parser.add_argument("--warmup", type=int, help="untimed calls first")
    parser.add_argument("--first-samples", type=int, help="first-call-after-idle samples per path")
    parser.add_argument("--idle-gap", type=float, default=1.5, help="idle seconds before each first call")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="window of the idle CPU measurement")
    parser.add_argument("--threads", type=int, default=4, help="worker threads (Dramatiq, RPCServer)")
    parser.add_argument("--batch", type=int, default=100, help="calls in flight per call_many()")
    parser.add_argument("--concurrency", type=int, default=10_000, help="acalls at once in acall-10k")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="dedicated DB (flushed!)",
    )
    parser.add_argument(
        "--rabbitmq-url",
        default=os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_RABBITMQ_URL),
        help="RabbitMQ of the call-rabbitmq path (its per-run queues are deleted at the end)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each group, wait up to this long for other Redis clients/CPU load to stop",
    )
    parser.add_argument(
        "--arq-python",
        default=arq_env.default_python(),
        help="python of the arq paths' environment (arq needs redis-py < 6; default .venv-arq/bin/python)",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    quick = {"calls": 300, "runs": 1, "warmup": 50, "first_samples": 3}
    full = {"calls": 2000, "runs": 3, "warmup": 200, "first_samples": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in ALL_PATHS]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(ALL_PATHS)}")
    args.path_list = wanted
    args.arq_python = os.path.abspath(args.arq_python)  # not resolved: a venv's python is a symlink
    if redis_db(args.redis_url) == 0:
        parser.error("refusing to use Redis DB 0: the benchmark flushes its DB; pick a dedicated one")
    return args


def client_budget(args: argparse.Namespace, n_paths: int) -> float:
    """Seconds a client process may take (generous: 50 ms per call, readiness, idle gaps)."""
    per_path = 60 + (args.warmup + args.runs * args.calls) * 0.05 + args.first_samples * (args.idle_gap + 11)
    return 30 + n_paths * per_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup runs on SIGTERM as on Ctrl-C
    tag = uuid.uuid4().hex[:8]
    own_name = f"rpc-tasks-bench-{tag}"
    db = redis_db(args.redis_url)
    r = redis.Redis.from_url(args.redis_url, socket_timeout=10, client_name=own_name)
    try:
        problem = claim_db(r, db, own_name, tag)
    except redis.RedisError as exc:
        print(f"Redis at {args.redis_url} is not reachable: {exc}", file=sys.stderr)
        return 1
    if problem:
        print(problem, file=sys.stderr)
        return 2
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "quick" if args.quick else "default"
    print(
        f"rpc-tasks benchmark ({mode}): {args.calls} calls x {args.runs} run(s), warm-up {args.warmup}, "
        f"{args.first_samples} first-call samples after {args.idle_gap}s idle; Redis {args.redis_url} "
        f"(flushed after), tag {tag}",
        flush=True,
    )
    env = dict(os.environ)
    env.update(
        {
            "BENCH_REDIS_URL": args.redis_url,
            "BENCH_RABBITMQ_URL": args.rabbitmq_url,
            "BENCH_TAG": tag,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    notes: list[str] = []
    raw_results: dict[str, dict[str, Any]] = {}
    idle_by_group: dict[str, dict[str, Any]] = {}  # by worker (WORKER_OF)
    workers: list[Worker] = []
    logdir = tempfile.mkdtemp(prefix=f"bench-{tag}-")
    groups = [g for g in GROUPS if any(p in args.path_list for p in g.paths)]
    env_by_group: dict[str, dict[str, float]] = {}
    rabbitmq_version: str | None = None
    rabbitmq_queues = Names(tag).rabbitmq_queues()
    rabbitmq_used = False  # its queues are to be deleted at the end
    other_versions: dict[str, str] = {}
    try:
        for i, group in enumerate(groups, 1):
            paths = [p for p in group.paths if p in args.path_list]
            if group.name == "celery" and importlib.util.find_spec("celery") is None:
                msg = "skipped: celery is not installed (pip install 'celery[redis]')"
                print(f"[{i}/{len(groups)}] celery: {msg}", flush=True)
                raw_results["celery"] = {"path": "celery", "skipped": msg}
                continue
            missing = OPTIONAL_PACKAGES.get(group.name)
            if missing and any(importlib.util.find_spec(m) is None for m in missing[0]):
                msg = f"skipped: {missing[1]} is not installed (pip install 'rpc-tasks[bench]')"
                print(f"[{i}/{len(groups)}] {group.name}: {msg}", flush=True)
                for p in paths:
                    raw_results[p] = {"path": p, "skipped": msg}
                continue
            if group.name == "rpc-rabbitmq":
                problem, rabbitmq_version = rabbitmq_check(args.rabbitmq_url)
                if problem:
                    msg = f"skipped: {problem}"
                    print(f"[{i}/{len(groups)}] {group.name}: {msg}", flush=True)
                    for p in paths:
                        raw_results[p] = {"path": p, "skipped": msg}
                    continue
                rabbitmq_used = True
            python, group_env = sys.executable, env
            if group.name in arq_env.WORKER_KINDS:  # its own environment (redis-py < 6), or skipped
                problem, found = arq_env.check(args.arq_python, env)
                if problem:
                    print(f"[{i}/{len(groups)}] {group.name}: {problem}", flush=True)
                    for p in paths:
                        raw_results[p] = {"path": p, "skipped": problem}
                    continue
                python, group_env = args.arq_python, arq_env.process_env(env)
                other_versions |= found
            env_by_group[group.name] = seen = quiet_environment(r, args.wait_quiet)
            if is_busy(seen):
                print(
                    f"  WARNING: before {group.name}: other Redis clients send "
                    f"{seen['redis_cmds_per_s']:.0f} commands/s, the machine is "
                    f"{seen['cpu_busy_pct']:.0f} % busy: numbers will be disturbed",
                    flush=True,
                )
            budget = client_budget(args, len(paths))
            kinds = list(dict.fromkeys(WORKER_OF[p] for p in paths))
            print(
                f"[{i}/{len(groups)}] {group.name}: starting {', '.join(kinds)}; "
                f"measuring {', '.join(paths)}",
                flush=True,
            )
            for kind in kinds:
                cmd, extra_env = worker_command(kind, args.threads, budget + 90, tag, python)
                workers.append(
                    Worker(
                        kind,
                        cmd,
                        env={**group_env, **extra_env},
                        cwd=str(ROOT),
                        log_path=os.path.join(logdir, f"{kind}.log"),
                        lifetime=budget + 90,
                    )
                )
            out_file = os.path.join(logdir, f"{group.name}.json")
            client_cmd = [
                python,
                "-m",
                "benchmarks.client",
                "--paths",
                ",".join(paths),
                "--calls",
                str(args.calls),
                "--runs",
                str(args.runs),
                "--warmup",
                str(args.warmup),
                "--first-samples",
                str(args.first_samples),
                "--idle-gap",
                str(args.idle_gap),
                "--batch",
                str(args.batch),
                "--concurrency",
                str(args.concurrency),
                "--max-seconds",
                str(budget),
                "--out",
                out_file,
            ]
            rc = run_bounded(client_cmd, env=group_env, cwd=str(ROOT), timeout=budget + 10)
            got: dict[str, Any] = {}
            if os.path.exists(out_file):
                with open(out_file, encoding="utf-8") as fh:
                    got = json.load(fh)
            for p in paths:
                raw_results[p] = got.get(p) or {"path": p, "error": f"client exited with {rc} and no result"}
            failed = [p for p in paths if "error" in raw_results[p]]
            for worker in workers:
                others = [w for w in workers if w is not worker and w.alive()]
                if worker.alive():
                    idle_by_group[worker.name] = measure_idle(worker, r, args.idle_seconds, others)
                else:
                    notes.append(
                        f"{worker.name}: the worker exited early (exit code {worker.proc.returncode})."
                    )
                mine = [p for p in failed if WORKER_OF[p] == worker.name]
                if mine or not worker.alive():
                    tail = worker.log_tail()
                    print(
                        f"  {worker.name}: {', '.join(mine) or 'worker'} failed; worker log tail:\n{tail}",
                        flush=True,
                    )
            for worker in workers:
                worker.stop()
            workers = []
            if group.name == "rpc-rabbitmq":
                notes.append(_delete_queues(args.rabbitmq_url, rabbitmq_queues))
                rabbitmq_used = False
            for p in paths:
                s = raw_results[p]
                if "error" in s:
                    print(f"  {p}: ERROR {s['error']}", flush=True)
                elif "na" in s:
                    print(f"  {p}: {s['na']}", flush=True)
                else:
                    runs = s.get("runs", [])
                    lat = sorted(v for run in runs for v in run.get("latencies_ms", []))
                    calls = sum(run["calls"] for run in runs)
                    secs = sum(run["elapsed_s"] for run in runs)
                    p50 = f"p50 {lat[len(lat) // 2]:.3f} ms, " if lat else ""
                    print(f"  {p}: {p50}{calls / secs:.0f} calls/s", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping workers and cleaning up (worker logs: {logdir})", file=sys.stderr)
        return 130
    finally:
        for worker in workers:
            worker.stop()
        if rabbitmq_used:  # interrupted or failed while the RabbitMQ group ran
            print(_delete_queues(args.rabbitmq_url, rabbitmq_queues), file=sys.stderr)
        try:
            note = release_db(r, db, own_name, tag)
            if note:
                notes.append(note)
                print(note, file=sys.stderr)
        except redis.RedisError as exc:
            print(f"could not clean Redis DB {db} up: {exc}", file=sys.stderr)

    if any("error" in raw for raw in raw_results.values()) or any("exited early" in n for n in notes):
        notes.append(f"worker logs kept in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    summaries: dict[str, dict[str, Any]] = {}
    group_of = {p: g.name for g in GROUPS for p in g.paths}
    for name, raw in raw_results.items():
        summaries[name] = report.summarize(raw, idle_by_group.get(WORKER_OF[name]))
    report.add_ratios(summaries)
    text = report.table(summaries)
    comparisons = report.comparisons(summaries)
    comparison_text = "\n".join(report.comparison_lines(comparisons))
    disturbed = [
        f"{g} before ({e['redis_cmds_per_s']:.0f} cmds/s, CPU {e['cpu_busy_pct']:.0f} %)"
        for g, e in env_by_group.items()
        if is_busy(e)
    ]
    # The idle window doubles as an after-check: our idle worker sends a few commands/s at most.
    disturbed += [
        f"{g} after ({i['redis_cmds_per_s']:.0f} cmds/s, CPU {i['machine_cpu_busy_pct']:.0f} %)"
        for g, i in idle_by_group.items()
        if (i["redis_cmds_per_s"] > BUSY_REDIS_CMDS_PER_S and g not in POLLING_WORKERS)
        or i["machine_cpu_busy_pct"] > BUSY_CPU_PCT
    ]
    if disturbed:
        notes.insert(
            0,
            "WARNING: other work was running on this machine/Redis around these groups (measured "
            "while our processes were idle): "
            + ", ".join(disturbed)
            + ". Their latencies, cmds/call and idle figures are disturbed; run again on a quiet machine "
            "(--wait-quiet SECONDS helps).",
        )
    for name, s in summaries.items():
        s["environment_before"] = env_by_group.get(group_of[name])
    notes.extend(standard_notes(summaries, idle_by_group, args))
    elapsed = time.monotonic() - started
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    png_path = out_dir / f"{stamp}.png"
    plot_error = None
    if args.no_plot:
        plot_error = "plot skipped (--no-plot)"
    else:
        title = (
            f"rpc-tasks benchmark {stamp} ({mode}: {args.calls} calls x {args.runs} runs, "
            f"{os.cpu_count()} CPUs, Redis {r.info('server').get('redis_version')})"
        )
        plot_error = report.plot(summaries, str(png_path), title)
    if plot_error:
        notes.append(plot_error)
    meta = {
        "timestamp": stamp,
        "mode": mode,
        "calls_per_run": args.calls,
        "runs": args.runs,
        "warmup": args.warmup,
        "first_call_samples": args.first_samples,
        "idle_gap_s": args.idle_gap,
        "idle_window_s": args.idle_seconds,
        "worker_threads": args.threads,
        "inflight_batch": args.batch,
        "redis_url": args.redis_url,
        "redis_version": r.info("server").get("redis_version"),
        "rabbitmq_url": redact(args.rabbitmq_url) if "call-rabbitmq" in args.path_list else None,
        "rabbitmq_version": rabbitmq_version,
        "environment_before_each_group": env_by_group,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions() | other_versions,
        "elapsed_s": round(elapsed, 1),
        "plot": None if plot_error else str(png_path),
    }
    payload = {
        "meta": meta,
        "table": text,
        "comparisons": comparisons,
        "comparisons_text": comparison_text,
        "notes": notes,
        "paths": summaries,
    }
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(clean_nan(payload), fh, indent=1, default=json_default, allow_nan=False)
    print()
    print(text)
    print()
    if comparison_text:
        print(comparison_text)
        print()
    for note in notes:
        print(f"* {note}")
    print(f"\nresults: {json_path}" + ("" if plot_error else f"\nplot:    {png_path}"))
    print(f"total time: {elapsed:.0f}s")
    return 0


def _delete_queues(url: str, queues: tuple[str, ...]) -> str:
    """Delete the run's RabbitMQ queues; returns a note saying so (or what is left)."""
    try:
        left = delete_rabbitmq_queues(url, queues)
    except Exception as exc:
        return (
            f"WARNING: could not delete the RabbitMQ queues {', '.join(queues)}: {type(exc).__name__}: {exc}"
        )
    if left:
        return f"WARNING: RabbitMQ queues still present after deleting them: {', '.join(left)}."
    return f"RabbitMQ queues {', '.join(queues)} deleted."


if __name__ == "__main__":
    sys.exit(main())
