"""Celery path, worker side (also imported by the client): Redis broker + Redis result backend.

    celery -A benchmarks.workers.celery_app worker -P solo

Stock settings apart from the URLs and a unique default queue. Needs ``celery[redis]``.
"""

from __future__ import annotations

import os

from celery import Celery

from benchmarks.common import redis_url

QUEUE = f"bench-{os.environ.get('BENCH_TAG', 'x')}-celery"

app = Celery("bench", broker=redis_url(), backend=redis_url())
app.conf.task_default_queue = QUEUE
app.conf.broker_connection_retry_on_startup = True


@app.task(name="bench.echo")
def echo(message: str) -> str:
    return message
