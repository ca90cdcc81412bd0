"""Raw floor, server side: ``BLPOP <requests>`` then ``LPUSH <reply_to> <payload>``.

    python -m benchmarks.workers.raw_echo --max-seconds 600

Plain redis-py, one connection, one request at a time. The request is JSON carrying the reply
key (``reply_to``), as in the other paths. Exits on SIGTERM/SIGINT or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import signal
import time

import redis

from benchmarks.common import names, redis_url


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = redis.Redis.from_url(redis_url())
    requests = names().raw_requests
    ends = time.monotonic() + args.max_seconds
    while not stop["now"] and time.monotonic() < ends:
        popped = client.blpop([requests], timeout=1)
        if popped is None:
            continue
        payload = popped[1]
        client.lpush(json.loads(payload)["reply_to"], payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
