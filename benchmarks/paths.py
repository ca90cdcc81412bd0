"""Client side of the benchmark: the :class:`Path` base class, the raw Redis floors every path
is compared with, and the helpers the Dramatiq-based paths share.

A path is one way of making a call: ``one()`` is a single round trip, ``run(n)`` a timed run.
:mod:`benchmarks.client` sets them up and measures them. The paths themselves:

* here: the floors ``raw``, ``streams-raw``, ``scripts-floor``;
* :mod:`benchmarks.rpc_paths`: rpc-tasks (``call``, ``send``, ``inflight``, ``streams``, the
  observability paths, ...);
* :mod:`benchmarks.peer_paths`: plain Dramatiq and Celery;
* :mod:`benchmarks.aio_paths`: async (``acall*`` and taskiq); :mod:`benchmarks.arq_paths`: arq.

The arq groups' client imports all of them with ``.venv-arq``'s python (redis-py 5, no
rpc_tasks; see :mod:`benchmarks.arq_env`): keep their module-level imports to the standard
library, redis and :mod:`benchmarks.common`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from benchmarks.common import MESSAGE, names, redis_url

#: Seconds a single timed call may take before the path is reported as failed.
CALL_TIMEOUT = 10.0


class Path:
    """One measured path. ``one()`` is a single round trip; ``run(n)`` a timed run."""

    name = ""
    #: Whether "first call after idle" is measured for this path.
    first_call = True
    #: At most this many calls per warm-up and per timed run (for paths of ~0.5 s a call).
    max_calls: int | None = None

    def calls(self, n: int) -> int:
        """The calls of a warm-up or timed run of ``n`` calls for this path."""
        return n if self.max_calls is None else min(n, self.max_calls)

    def setup(self) -> None:
        pass

    def probe(self) -> None:
        """One call with a short timeout; raises while the worker is not answering yet."""
        self.one()

    def one(self) -> None:
        raise NotImplementedError

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        latencies: list[float] = []
        one = self.one
        clock = time.perf_counter
        started = clock()
        for _ in range(n):
            t0 = clock()
            one()
            latencies.append((clock() - t0) * 1000.0)
            bar.update(1)
        elapsed = clock() - started
        return {"calls": n, "elapsed_s": elapsed, "latencies_ms": latencies}

    def na_reason(self) -> str | None:
        """Why the path cannot be measured (then it is reported as ``n/a``)."""
        return None

    def close(self) -> None:
        pass


# -- floors -----------------------------------------------------------------------------------


class RawPath(Path):
    """Client ``LPUSH`` + ``BLPOP`` against ``workers/raw_echo.py`` (``BLPOP`` + ``LPUSH``)."""

    name = "raw"

    def setup(self) -> None:
        self.r = redis.Redis.from_url(redis_url())
        self.n = names()

    def _call(self, timeout: float) -> None:
        key = self.n.raw_reply_prefix + uuid.uuid4().hex
        payload = json.dumps({"reply_to": key, "message": MESSAGE})
        self.r.lpush(self.n.raw_requests, payload)
        if self.r.blpop([key], timeout=timeout) is None:
            raise TimeoutError("no reply from raw_echo")

    def probe(self) -> None:
        self._call(1)

    def one(self) -> None:
        self._call(CALL_TIMEOUT)

    def close(self) -> None:
        self.r.close()


class StreamsRawPath(RawPath):
    """Client ``XADD`` + ``BLPOP`` against ``workers/streams_raw.py`` (``XREADGROUP BLOCK`` +
    ``LPUSH`` + ``XACK``)."""

    name = "streams-raw"

    def _call(self, timeout: float) -> None:
        key = self.n.xraw_reply_prefix + uuid.uuid4().hex
        payload = json.dumps({"reply_to": key, "message": MESSAGE})
        self.r.xadd(self.n.xraw_stream, {"payload": payload}, maxlen=10000, approximate=True)
        if self.r.blpop([key], timeout=timeout) is None:
            raise TimeoutError("no reply from streams_raw")


class ScriptsFloorPath(RawPath):
    """The round trips of a ``.call()`` on ``BlockingRedisBroker`` with Dramatiq's own scripts
    and message JSON, but no Dramatiq (worker, middleware) or rpc-tasks (validation) code:
    ``EVALSHA`` enqueue + ``BLPOP`` + ``DEL`` in one write, against
    ``workers/scripts_echo.py``."""

    name = "scripts-floor"

    def setup(self) -> None:
        from benchmarks.workers import scripts_echo
        from rpc_tasks.redis.connection import pipelined

        self.n = names()
        self.b = scripts_echo.broker()
        self.queue = self.n.queue(scripts_echo.KIND)
        self.pipelined = pipelined
        script = self.b.scripts["dispatch_rpc"]
        script(keys=[self.b.namespace], args=self.b._dispatch_args("fetch", self.queue, 0))  # load it
        self.sha = script.sha

    def _call(self, timeout: float) -> None:
        key = self.n.raw_reply_prefix + uuid.uuid4().hex
        rid = str(uuid.uuid4())
        message = {
            "queue_name": self.queue,
            "actor_name": "echo",
            "args": [{"message": MESSAGE}],
            "kwargs": {},
            "options": {"redis_message_id": rid, "reply_to": key},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
        data = json.dumps(message, separators=(",", ":")).encode()
        enqueue = ("EVALSHA", self.sha, 1, self.b.namespace, *self.b._enqueue_args(self.queue, rid, data))
        replies = self.pipelined(self.b.client, [enqueue, ("BLPOP", key, timeout), ("DEL", key)])
        if replies[1] is None:
            raise TimeoutError("no reply from scripts_echo")

    def close(self) -> None:
        self.b.close()


# -- shared by the Dramatiq-based paths -------------------------------------------------------

#: The broker, actor and queue of each ``workers/dramatiq_app.py`` kind, built once per process.
_built: dict[str, Any] = {}


def build(kind: str) -> tuple[Any, Any, str]:
    """``benchmarks.workers.dramatiq_app.build(kind)``, once per process (shared by the
    rpc-tasks and the Dramatiq paths)."""
    if kind not in _built:
        from benchmarks.workers import dramatiq_app

        _built[kind] = dramatiq_app.build(kind)
    return _built[kind]


def run_in_batches(
    n: int,
    bar: Any,
    batch: int,
    one_batch: Callable[[int], list[Any]],
    right: Callable[[list[Any], int], bool],
) -> dict[str, Any]:
    """A timed run of ``n`` calls made ``batch`` at a time by ``one_batch(size)`` (its results,
    checked by ``right(results, size)`` outside the timing): each batch's time, no per-call
    latencies."""
    batches: list[float] = []
    clock = time.perf_counter
    started = clock()
    left = n
    while left > 0:
        size = min(batch, left)
        t0 = clock()
        results = one_batch(size)
        batches.append((clock() - t0) * 1000.0)
        if not right(results, size):
            raise AssertionError("a batch returned wrong results")
        left -= size
        bar.update(size)
    return {"calls": n, "elapsed_s": clock() - started, "latencies_ms": [], "batch_ms": batches}


def send_and_join(path: Any, n: int, bar: Any) -> dict[str, Any]:
    """The ``send`` measurement, shared with ``dramatiq-send``: ``path.actor.send(path.params)``
    ``n`` times (each timed), then ``path.broker.join(path.queue)`` until all were processed."""
    path.broker.join(path.queue, interval=5, timeout=30_000)
    latencies: list[float] = []
    send = path.actor.send
    params = path.params
    clock = time.perf_counter
    started = clock()
    for _ in range(n):
        t0 = clock()
        send(params)
        latencies.append((clock() - t0) * 1000.0)
        bar.update(1)
    sent = clock()
    path.broker.join(path.queue, interval=5, timeout=120_000)
    done = clock()
    return {
        "calls": n,
        "elapsed_s": done - started,
        "latencies_ms": latencies,
        "enqueue_per_s": n / (sent - started),
        "drain_after_last_send_s": done - sent,
    }
