"""arq paths, worker side: one arq ``Worker`` (``Worker(...).run()``, as ``run_worker`` does),
stock settings apart from the Redis URL (``BENCH_REDIS_URL``), a per-run queue name and, for
``BENCH_ARQ_KIND=fast``, a 1 ms ``poll_delay`` (arq's default: 0.5 s, ``BENCH_ARQ_KIND=default``).

    .venv-arq/bin/python -m benchmarks.workers.arq_app

Runs in its own environment (``.venv-arq``: arq needs redis-py < 6, the project redis-py >= 7):
it imports arq and the standard library only (plus :mod:`benchmarks.common`, standard library
too), never rpc_tasks.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker

from benchmarks.common import redis_url

#: ``BENCH_ARQ_KIND`` -> the worker's ``poll_delay`` (s); ``None``: arq's default (0.5 s).
POLL_DELAYS: dict[str, float | None] = {"default": None, "fast": 0.001}


def queue_name(kind: str) -> str:
    """The queue of one worker kind in this run (the client side uses the same name)."""
    return f"bench-{os.environ.get('BENCH_TAG', 'x')}-arq-{kind}"


async def echo(ctx: dict[str, Any], message: str) -> str:
    """The job every arq path calls."""
    return message


def settings(kind: str) -> dict[str, Any]:
    """``Worker`` keyword arguments of one worker kind."""
    if kind not in POLL_DELAYS:
        raise SystemExit(f"BENCH_ARQ_KIND must be one of {', '.join(POLL_DELAYS)}, not {kind!r}")
    out: dict[str, Any] = {
        "functions": [echo],
        "redis_settings": RedisSettings.from_dsn(redis_url()),
        "queue_name": queue_name(kind),
    }
    delay = POLL_DELAYS[kind]
    if delay is not None:
        out["poll_delay"] = delay
    return out


if __name__ == "__main__":
    Worker(**settings(os.environ.get("BENCH_ARQ_KIND", "default"))).run()
