"""The fleet's ceiling on this machine: calls/s and Redis server CPU per call, by path, with 1, 2
and 4 caller processes x 1 and 2 worker processes.

    python -m benchmarks.fleet                      # all paths, 5 s per cell (~5 min)
    python -m benchmarks.fleet --paths call,streams --seconds 3

Every cell runs against a **private** ``redis-server`` started on a free loopback port, so
``INFO commandstats`` and ``INFO cpu`` count this benchmark's commands only. Each caller process
runs one path's client (``benchmarks/client.py``) in a closed loop (one call at a time, as a web
request would) for ``--seconds`` after a common start; the workers are the same processes as
``make bench`` uses. Per cell it reports:

* ``calls/s``: all callers' completed calls / the window;
* ``redis us/call``: Redis server CPU (``used_cpu_user`` + ``used_cpu_sys``) per call, the figure
  that says how many calls one Redis core carries; ``cmd us/call``: the same from
  ``INFO commandstats`` (time inside commands only, without networking);
* ``calls/s per Redis core`` (projected): 1e6 / ``redis us/call``.

Celery needs ``celery[redis]`` (the ``bench`` extra); a path whose client cannot be set up is
reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import free_port

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("raw", "call", "streams", "celery")
CALLERS = (1, 2, 4)
WORKERS = (1, 2)


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rpc-tasks-fleet-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def worker_command(path: str, index: int) -> list[str]:
    py = sys.executable
    if path == "raw":
        return [py, "-m", "benchmarks.workers.raw_echo"]
    if path == "call":
        return [py, "-m", "dramatiq", "benchmarks.workers.dramatiq_app", "--processes", "1", "--threads", "4"]
    if path == "streams":
        return [py, "-m", "rpc_tasks.cli", "--log-level", "WARNING", "serve", "--app",
                "benchmarks.workers.streams_app:make_server", "--concurrency", "4", "--consumer-name",
                f"fleet-{index}"]  # fmt: skip
    if path == "celery":
        return [py, "-m", "celery", "-A", "benchmarks.workers.celery_app", "worker", "-P", "solo", "-c", "1",
                "--loglevel", "WARNING", "-n", f"fleet{index}@%h"]  # fmt: skip
    raise ValueError(path)


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_usec(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k not in ("cmdstat_info",))


def run_cell(url: str, path: str, callers: int, workers: int, seconds: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_TAG": tag, "BENCH_DRAMATIQ_KIND": "blocking"}
    client = redis.Redis.from_url(url)
    procs = [
        subprocess.Popen(worker_command(path, i), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        for i in range(workers)
    ]  # fmt: skip
    go_key = f"fleet:{tag}:go"
    ready_key = f"fleet:{tag}:ready"
    caller_procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.fleet", "--caller", path, "--go-key", go_key,
                          "--ready-key", ready_key, "--seconds", str(seconds)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
        for _ in range(callers)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while client.llen(ready_key) < callers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in caller_procs):
                errors = [
                    p.communicate(timeout=5)[1].decode()[-400:] for p in caller_procs if p.poll() is not None
                ]
                return {
                    "path": path,
                    "callers": callers,
                    "workers": workers,
                    "error": "not ready: " + " | ".join(errors),
                }
            time.sleep(0.05)
        start = time.time() + 0.5
        client.set(go_key, repr(start))
        time.sleep(max(0.0, start - time.time()))
        cpu0, usec0 = redis_cpu(client), command_usec(client)
        time.sleep(seconds)
        cpu1, usec1 = redis_cpu(client), command_usec(client)
        results = [json.loads(p.communicate(timeout=seconds + 60)[0].decode() or "{}") for p in caller_procs]
    finally:
        for proc in [*caller_procs, *procs]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*caller_procs, *procs]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    calls = sum(int(r.get("calls", 0)) for r in results)
    errors = sum(int(r.get("errors", 0)) for r in results)
    per_call_cpu = (cpu1 - cpu0) * 1e6 / calls if calls else float("nan")
    return {
        "path": path,
        "callers": callers,
        "workers": workers,
        "calls": calls,
        "errors": errors,
        "calls_per_s": calls / seconds,
        "redis_cpu_us_per_call": per_call_cpu,
        "redis_cmd_us_per_call": (usec1 - usec0) / calls if calls else float("nan"),
        "per_redis_core": 1e6 / per_call_cpu if calls and per_call_cpu > 0 else float("nan"),
    }


def caller_main(path: str, go_key: str, ready_key: str, seconds: float) -> int:
    from benchmarks.client import PATHS as CLIENT_PATHS
    from benchmarks.client import wait_ready

    client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    bench = CLIENT_PATHS[path]()
    bench.setup()
    wait_ready(bench, 60)
    client.rpush(ready_key, "1")
    while (raw := client.get(go_key)) is None:
        time.sleep(0.01)
    start = float(raw)
    time.sleep(max(0.0, start - time.time()))
    end = start + seconds
    calls = errors = 0
    one = bench.one
    while time.time() < end:
        try:
            one()
            calls += 1
        except Exception:
            errors += 1
    print(json.dumps({"calls": calls, "errors": errors}))
    bench.close()
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'path':<8} {'workers':>7} {'callers':>7} {'calls/s':>9} {'redis us/call':>13} {'cmd us/call':>11} {'calls/s per Redis core':>22} {'errors':>6}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<8} {r['workers']:>7} {r['callers']:>7}  {r['error'][:80]}")
            continue
        lines.append(
            f"{r['path']:<8} {r['workers']:>7} {r['callers']:>7} {r['calls_per_s']:>9.0f} "
            f"{r['redis_cpu_us_per_call']:>13.1f} {r['redis_cmd_us_per_call']:>11.1f} "
            f"{r['per_redis_core']:>22.0f} {r['errors']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window per cell")
    parser.add_argument("--callers", default="1,2,4")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--caller", help=argparse.SUPPRESS)
    parser.add_argument("--go-key", help=argparse.SUPPRESS)
    parser.add_argument("--ready-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.caller:
        return caller_main(args.caller, args.go_key, args.ready_key, args.seconds)
    server = PrivateRedis()
    rows: list[dict[str, Any]] = []
    try:
        for path in args.paths.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for callers in (int(c) for c in args.callers.split(",")):
                    row = run_cell(server.url, path, callers, workers, args.seconds)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        server.stop()
    print(table(rows))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps({"rows": rows, "seconds": args.seconds, "cpus": os.cpu_count()}, indent=1))
    print(f"\n{target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
