"""arq paths of the benchmark (client side): ``arq``, ``arq-fast``, ``arq-1k``, ``arq-10k``.

arq 0.28 (the current release) needs redis-py < 6, rpc-tasks redis-py >= 7: these paths run in
a client process of their own environment (``.venv-arq``, see :mod:`benchmarks.arq_env`),
against workers of that environment (``benchmarks/workers/arq_app.py``). Nothing here imports
rpc_tasks; arq itself is imported only when a path is set up, so the runner and the main
environment can import this module without arq.

* ``arq``: ``await (await pool.enqueue_job("echo", x)).result()`` with arq's defaults: the worker
  polls its queue every 0.5 s (``poll_delay``), the caller polls the result every 0.5 s.
  At ~0.5 s a call, its runs are capped at :attr:`ArqPath.max_calls` calls;
* ``arq-fast``: the same with a 1 ms ``poll_delay`` on both sides;
* ``arq-1k``, ``arq-10k``: 1,000 / ``--concurrency`` (10,000) ``arq-fast`` calls at once from
  one loop (1 ms ``poll_delay`` on both sides: with 0.5 s on the caller's side, 10,000 calls
  were not faster, 1,000 slower), on a pool of :data:`POOL_SIZE` connections.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.aio_paths import Acall10kPath, AsyncPeerPath, burst
from benchmarks.common import MESSAGE, redis_url

#: Connections of the bursts' pool (a ``BlockingConnectionPool``: a call waits for a free one).
#: arq's own pool is unbounded, and 10,000 calls at once would each open a connection (Redis'
#: default ``maxclients`` is 10,000, for every client of the server).
POOL_SIZE = 200


class ArqPath(AsyncPeerPath):
    """arq at its defaults, one call at a time."""

    name = "arq"
    #: The worker kind (``benchmarks/workers/arq_app.py``: ``default`` or ``fast``).
    kind = "default"
    #: ``Job.result(poll_delay=...)``; arq's default is 0.5 s.
    poll_delay = 0.5
    #: At ~0.5 s a call, warm-up and timed runs are capped at this many calls.
    max_calls: int | None = 20

    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(self._pool())

    async def _pool(self) -> Any:
        from arq.connections import RedisSettings, create_pool

        from benchmarks.workers.arq_app import queue_name

        settings = RedisSettings.from_dsn(redis_url())
        return await create_pool(settings, default_queue_name=queue_name(self.kind))

    async def _one(self, timeout: float) -> None:
        job = await self.pool.enqueue_job("echo", MESSAGE)
        result = await job.result(timeout=timeout, poll_delay=self.poll_delay)
        if result != MESSAGE:
            raise AssertionError(f"bad echo {result!r}")

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()


class ArqFastPath(ArqPath):
    """arq with a 1 ms ``poll_delay`` on the worker and on ``Job.result()``."""

    name = "arq-fast"
    kind = "fast"
    poll_delay = 0.001
    max_calls = None


class ArqBurstPath(ArqPath):
    """``--concurrency`` ``arq-fast`` calls at once from one loop."""

    name = "arq-10k"
    kind = "fast"
    poll_delay = 0.001
    max_calls = None
    first_call = False

    async def _pool(self) -> Any:
        from arq.connections import ArqRedis
        from redis.asyncio import BlockingConnectionPool

        from benchmarks.workers.arq_app import queue_name

        pool = BlockingConnectionPool.from_url(redis_url(), max_connections=POOL_SIZE, timeout=120)
        return ArqRedis(pool, default_queue_name=queue_name(self.kind))

    def count(self) -> int:
        return Acall10kPath.concurrency

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        many = burst(lambda: self._one(120.0), self.count(), bar, self.pool.connection_pool.disconnect)
        return dict(self.loop.run_until_complete(many))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.run_until_complete(self.pool.connection_pool.disconnect())
        self.loop.close()


class Arq1kPath(ArqBurstPath):
    """1,000 arq calls at once from one loop."""

    name = "arq-1k"

    def count(self) -> int:
        return 1000


PATHS = {cls.name: cls for cls in (ArqPath, ArqFastPath, Arq1kPath, ArqBurstPath)}
