"""Async callers on a Redis the event loop cannot reach itself: a Sentinel-managed or Redis
Cluster reply client (``redis+sentinel://``, ``redis+cluster://``), or a custom pool.

The loop's reply reader needs to know which one server the replies go to; these clients do
not say (Sentinel moves the master, a cluster spreads the keys). So there, ``acall`` and
``acall_many`` run their sync twins (:mod:`rpc_tasks.calls`, with Sentinel failover and cluster
routing) in a thread pool of their own: the loop never blocks, the errors, results and
deadlines are the sync ones, and a waiting call holds a thread instead of a future (at most
:data:`MAX_THREADS` wait at once; more wait their turn, their deadline running). Cancelling the
awaiting task stops the wait for the caller; the thread finishes its wait in the background.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..exceptions import RPCTimeoutError
from ..redis.replies import ReplyChannel
from .connection import ConnectionSpec

__all__ = ["MAX_THREADS", "needs_thread", "run_sync_call"]

#: Threads of the pool (shared by every loop of the process).
MAX_THREADS = 64

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
#: ``id(channel) -> (channel, needs a thread)``: the answer never changes for a channel.
_decided: dict[int, tuple[ReplyChannel, bool]] = {}


def needs_thread(channel: ReplyChannel) -> bool:
    """True when the loop cannot read ``channel``'s replies itself (see the module docstring)."""
    known = _decided.get(id(channel))
    if known is not None and known[0] is channel:
        return known[1]
    pool = getattr(channel.client, "connection_pool", None)
    answer = pool is None or ConnectionSpec.like(channel.client) is None
    _decided[id(channel)] = (channel, answer)
    return answer


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="rpc-tasks-acall")
        return _executor


def _before_deadline(method: str, timeout: float, deadline: float, fn: Callable[[float], T]) -> T:
    left = deadline - time.time()
    if left <= 0:  # waited for a thread past the caller's deadline: nothing was enqueued
        raise RPCTimeoutError(method, timeout)
    return fn(left)


async def run_sync_call(method: str, timeout: float, fn: Callable[[float], T]) -> T:
    """``fn(seconds left)`` in the pool, within ``timeout`` seconds from now (the context
    variables of the caller, e.g. its trace span, go along)."""
    deadline = time.time() + timeout
    context = contextvars.copy_context()
    call = functools.partial(context.run, _before_deadline, method, timeout, deadline, fn)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)
