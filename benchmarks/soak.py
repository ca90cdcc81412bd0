"""Soak: N sequential ``.call()``s (1 % of them time out on purpose) against one worker
process; reports worker and caller RSS growth and reply keys left after their TTL.

    python -m benchmarks.soak [--calls 100000]

Uses Redis DB 13 (``SOAK_REDIS_URL``), flushed at the start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import redis


def rss_mb(pid: int) -> float:
    total = 0
    pids = [
        str(pid),
        *subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split(),
    ]
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    url = os.environ.setdefault("SOAK_REDIS_URL", "redis://127.0.0.1:6379/13")
    client = redis.Redis.from_url(url)
    client.flushdb()
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "benchmarks.soak_actors", "--processes", "1", "--threads", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from benchmarks import soak_actors
    from rpc_tasks import RPCTimeoutError

    try:
        for _ in range(100):
            try:
                soak_actors.echo.call(soak_actors.Params(n=0), timeout=1)
                break
            except RPCTimeoutError:
                continue
        for i in range(2000):
            soak_actors.echo.call(soak_actors.Params(n=i), timeout=5)
        worker0, caller0 = rss_mb(worker.pid), rss_mb(os.getpid())
        timeouts = unexpected = 0
        started = time.time()
        for i in range(args.calls):
            if i % 100 == 99:
                try:
                    soak_actors.echo.call(soak_actors.Params(n=i, sleep=0.06), timeout=0.02)
                except RPCTimeoutError:
                    timeouts += 1
            else:
                try:
                    soak_actors.echo.call(soak_actors.Params(n=i), timeout=5)
                except RPCTimeoutError:
                    unexpected += 1
            if i and i % 20_000 == 0:
                print(f"  {i} calls, {time.time() - started:.0f}s", flush=True)
        worker1, caller1 = rss_mb(worker.pid), rss_mb(os.getpid())
        print(
            f"{args.calls} calls in {time.time() - started:.0f}s: {timeouts} deliberate timeouts, "
            f"{unexpected} unexpected; worker RSS {worker0:.1f} -> {worker1:.1f} MB "
            f"(+{worker1 - worker0:.1f}), caller {caller0:.1f} -> {caller1:.1f} MB (+{caller1 - caller0:.1f})"
        )
        keys = list(client.scan_iter(match="soak:resp:*", count=1000))
        without_ttl = sum(1 for k in keys if client.ttl(k) < 0)
        time.sleep(6)
        left = len(list(client.scan_iter(match="soak:resp:*", count=1000)))
        print(f"reply keys right after: {len(keys)} (without TTL: {without_ttl}); after the 5 s TTL: {left}")
        return 0 if unexpected == 0 and without_ttl == 0 and left == 0 else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


if __name__ == "__main__":
    raise SystemExit(main())
