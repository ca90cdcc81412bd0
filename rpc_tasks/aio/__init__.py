"""Async callers over ``redis.asyncio``: ``await actor.acall()``, ``acall_many()``,
``asend()`` (:mod:`rpc_tasks.aio.calls`), the per-loop reply reader
(:mod:`rpc_tasks.aio.replies`) and :class:`~rpc_tasks.aio.client.AsyncWebSocketRPCClient`."""

from .connection import aclose_loop_connections

__all__ = ["aclose_loop_connections"]
