"""Client side of the benchmark: measures the paths of one worker group and writes JSON.

    python -m benchmarks.client --paths call,send,inflight --calls 2000 --runs 3 --out x.json

Started by ``benchmarks.run`` in its own process (after the group's worker process is up), so
that each group's imports and global state (Dramatiq's global broker and encoder, Celery's app)
stay apart. For each path: wait until the worker answers and warm up; then ``--runs`` timed runs
of ``--calls`` calls (``INFO commandstats`` read before and after each run), interleaved across
the group's paths (run 1 of each, run 2 of each, ...); then ``--first-samples`` single calls
each after ``--idle-gap`` seconds of silence. The paths themselves are defined in
:mod:`benchmarks.paths` (base class, floors) and the modules it lists.

The arq groups' client runs this module with ``.venv-arq``'s python (redis-py 5, no rpc_tasks;
see :mod:`benchmarks.arq_env`): keep its module-level imports to the standard library, redis
and :mod:`benchmarks.common` (the paths modules too).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import redis

from benchmarks import aio_paths, arq_paths
from benchmarks.common import commands_delta, commandstats, progress, redis_url
from benchmarks.paths import Path, RawPath, ScriptsFloorPath, StreamsRawPath
from benchmarks.peer_paths import CeleryPath, DramatiqResultsPath, DramatiqSendPath, InflightDramatiqPath
from benchmarks.rpc_paths import (
    CallPath,
    CallPlainPath,
    CallRabbitmqPath,
    InflightPath,
    MetricsOursPath,
    MetricsPath,
    ObsBasePath,
    OtelApiPath,
    OtelSdkPath,
    PlainSendPath,
    SendPath,
    StreamsPath,
)

#: The synchronous paths by name (what ``benchmarks.fleet``, ``placement`` and ``obs_cost`` look
#: up); :func:`main` adds the async ones of :mod:`benchmarks.aio_paths` and ``arq_paths``.
PATHS: dict[str, type[Path]] = {
    cls.name: cls
    for cls in (
        RawPath,
        ScriptsFloorPath,
        CallPath,
        CallPlainPath,
        CallRabbitmqPath,
        SendPath,
        PlainSendPath,
        DramatiqSendPath,
        InflightPath,
        DramatiqResultsPath,
        InflightDramatiqPath,
        CeleryPath,
        StreamsRawPath,
        StreamsPath,
        ObsBasePath,
        OtelApiPath,
        OtelSdkPath,
        MetricsPath,
        MetricsOursPath,
    )
}


def wait_ready(path: Path, seconds: float) -> float:
    """Probe until the worker answers; returns the seconds it took."""
    started = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - started < seconds:
        try:
            path.probe()
            return time.monotonic() - started
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"worker for {path.name!r} did not answer within {seconds:.0f}s: {last!r}")


def prepare(path: Path, args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """Set a path up, wait for its worker and warm it up; its result record."""
    out: dict[str, Any] = {"path": path.name, "runs": [], "first_call_ms": []}
    reason = path.na_reason()
    if reason:
        out["na"] = reason
        bar.update(planned_calls(path, args))
        return out
    path.setup()
    bar.set_description(f"{path.name} (waiting)", refresh=False)
    out["ready_s"] = wait_ready(path, args.ready_timeout)
    bar.set_description(f"{path.name} warm-up", refresh=False)
    path.run(path.calls(args.warmup), bar)
    return out


def timed_run(
    path: Path, args: argparse.Namespace, bar: Any, r: redis.Redis, i: int, out: dict[str, Any]
) -> None:
    bar.set_description(f"{path.name} run {i + 1}/{args.runs}", refresh=False)
    gc.collect()
    before = commandstats(r)
    run = path.run(path.calls(args.calls), bar)
    after = commandstats(r)
    run["commands"] = commands_delta(before, after)
    out["runs"].append(run)


def first_calls(path: Path, args: argparse.Namespace, bar: Any, out: dict[str, Any]) -> None:
    if not path.first_call:
        bar.update(args.first_samples)
        return
    bar.set_description(f"{path.name} after idle", refresh=False)
    for _ in range(args.first_samples):
        time.sleep(args.idle_gap)
        t0 = time.perf_counter()
        path.one()
        out["first_call_ms"].append((time.perf_counter() - t0) * 1000.0)
        bar.update(1)


def measure_group(names: list[str], args: argparse.Namespace, bar: Any, r: redis.Redis) -> dict[str, Any]:
    """Measure the paths of one worker group with their timed runs *interleaved* (run 1 of
    every path, then run 2, ...), so that paths compared with each other (``send`` and
    ``plain-send``) see the same machine conditions."""
    results: dict[str, Any] = {}
    live: dict[str, Path] = {}

    def fail(name: str, exc: Exception) -> None:
        traceback.print_exc()
        results[name] = {"path": name, "error": f"{type(exc).__name__}: {exc}"}
        path = live.pop(name, None)
        if path is not None:
            try:
                path.close()
            except Exception:
                pass

    for name in names:
        path = live[name] = PATHS[name]()
        try:
            results[name] = prepare(path, args, bar)
            if "na" in results[name]:
                live.pop(name).close()
        except Exception as exc:
            fail(name, exc)
    for i in range(args.runs):
        # Each round starts with the next path, so no path always runs first (or last).
        shift = i % max(1, len(live))
        order = list(live)
        for name in order[shift:] + order[:shift]:
            if name not in live:  # failed earlier in this round
                continue
            try:
                timed_run(live[name], args, bar, r, i, results[name])
            except Exception as exc:
                fail(name, exc)
    for name in list(live):
        try:
            first_calls(live[name], args, bar, results[name])
        except Exception as exc:
            fail(name, exc)
    for path in live.values():
        try:
            path.close()
        except Exception:
            pass
    return results


def planned_calls(path: Path, args: argparse.Namespace) -> int:
    """Calls the progress bar counts for one path (bursts count more: they report their own)."""
    return path.calls(args.warmup) + args.runs * path.calls(args.calls) + args.first_samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paths", required=True, help="comma-separated: " + ",".join(PATHS))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--first-samples", type=int, default=5)
    parser.add_argument("--idle-gap", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10_000, help="acalls at once in acall-10k")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard limit of this process")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # Bounded in time whatever happens (a hung Redis call, a worker that never answers).
    timer = threading.Timer(args.max_seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    InflightPath.batch = InflightDramatiqPath.batch = args.batch
    PATHS.update(aio_paths.PATHS)
    PATHS.update(arq_paths.PATHS)
    aio_paths.Acall10kPath.concurrency = args.concurrency

    selected = [p for p in args.paths.split(",") if p]
    r = redis.Redis.from_url(redis_url())
    results: dict[str, Any] = {}
    total = sum(planned_calls(PATHS[p](), args) for p in selected if p in PATHS)
    bar = progress(total, selected[0] if selected else "")
    try:
        results = measure_group(selected, args, bar, r)
    finally:
        bar.close()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # stopped by the runner (SIGTERM) or Ctrl-C
        sys.exit(130)
