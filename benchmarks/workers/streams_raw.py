"""Raw Streams floor, server side: ``XREADGROUP ... BLOCK`` then ``LPUSH <reply_to>`` + ``XACK``
(pipelined, one round trip).

    python -m benchmarks.workers.streams_raw --max-seconds 600

Plain redis-py, one consumer, one entry at a time. Exits on SIGTERM/SIGINT or after
``--max-seconds``.
"""

from __future__ import annotations

import json

import redis

from benchmarks.common import echo_worker_running, names, redis_url


def main() -> int:
    running = echo_worker_running()
    n = names()
    client = redis.Redis.from_url(redis_url())
    try:
        client.xgroup_create(n.xraw_stream, n.group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    while running():
        got = client.xreadgroup(n.group, "raw-1", {n.xraw_stream: ">"}, count=1, block=1000)
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                payload = fields[b"payload"]
                with client.pipeline(transaction=False) as pipe:
                    pipe.lpush(json.loads(payload)["reply_to"], payload)
                    pipe.xack(n.xraw_stream, n.group, entry_id)
                    pipe.execute()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
