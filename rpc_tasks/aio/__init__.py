"""Async callers over ``redis.asyncio``: ``await actor.acall()``, ``acall_many()``,
``asend()`` (:mod:`rpc_tasks.aio.calls`), the per-loop reply reader
(:mod:`rpc_tasks.aio.replies`) and :class:`~rpc_tasks.aio.client.AsyncWebSocketRPCClient`."""

from .client import AsyncWebSocketRPCClient, get_async_rpc_client
from .connection import aclose_loop_connections

__all__ = ["AsyncWebSocketRPCClient", "aclose_loop_connections", "get_async_rpc_client"]
