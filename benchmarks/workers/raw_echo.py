"""Raw floor, server side: ``BLPOP <requests>`` then ``LPUSH <reply_to> <payload>``.

    python -m benchmarks.workers.raw_echo --max-seconds 600

Plain redis-py, one connection, one request at a time. The request is JSON carrying the reply
key (``reply_to``), as in the other paths. Exits on SIGTERM/SIGINT or after ``--max-seconds``.
"""

from __future__ import annotations

import json

import redis

from benchmarks.common import echo_worker_running, names, redis_url


def main() -> int:
    running = echo_worker_running()
    client = redis.Redis.from_url(redis_url())
    requests = names().raw_requests
    while running():
        popped = client.blpop([requests], timeout=1)
        if popped is None:
            continue
        payload = popped[1]
        client.lpush(json.loads(payload)["reply_to"], payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
