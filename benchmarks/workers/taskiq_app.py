"""Taskiq path, worker side (also imported by the client): taskiq-redis's ``RedisStreamBroker``
and ``RedisAsyncResultBackend``, stock settings apart from the URL, a per-run stream name,
results that expire (60 s), and pools of at most 200 connections each, a 30 s connect timeout
and 120 s to wait for a free connection. With its defaults, 10,000 concurrent calls fail:
"Timeout connecting to server" (a connection per waiting call, opened while the loop is busy
starting the others), then, with 200 connections, "No connection available" (20 s).

    taskiq worker benchmarks.workers.taskiq_app:broker --workers 1

Needs ``taskiq`` and ``taskiq-redis`` (the ``bench`` extra).
"""

from __future__ import annotations

import os

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.common import redis_url

QUEUE = f"bench-{os.environ.get('BENCH_TAG', 'x')}-taskiq"

#: Connections per pool (broker and result backend).
POOL_SIZE = 200

broker = RedisStreamBroker(
    url=redis_url(), queue_name=QUEUE, max_connection_pool_size=POOL_SIZE
).with_result_backend(
    RedisAsyncResultBackend(redis_url=redis_url(), result_ex_time=60, max_connection_pool_size=POOL_SIZE)
)


@broker.task(task_name="bench.echo")
async def echo(message: str) -> str:
    return message
