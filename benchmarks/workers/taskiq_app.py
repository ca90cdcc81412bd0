"""Taskiq path, worker side (also imported by the client): taskiq-redis's ``RedisStreamBroker``
and ``RedisAsyncResultBackend``, stock settings apart from the URL, a per-run stream name and
results that expire (60 s).

    taskiq worker benchmarks.workers.taskiq_app:broker --workers 1

Needs ``taskiq`` and ``taskiq-redis`` (the ``bench`` extra).
"""

from __future__ import annotations

import os

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.common import redis_url

QUEUE = f"bench-{os.environ.get('BENCH_TAG', 'x')}-taskiq"

broker = RedisStreamBroker(url=redis_url(), queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(redis_url=redis_url(), result_ex_time=60)
)


@broker.task(task_name="bench.echo")
async def echo(message: str) -> str:
    return message
