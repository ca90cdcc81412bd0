"""The fault suite's caller side: the worker module's actors and a Streams client on the same
settings (import after ``CHAOS_REDIS_URL`` / ``CHAOS_TAG`` are set)."""

from __future__ import annotations

from typing import Any

from benchmarks.workers.chaos_app import QUEUE, Done, Job, chaos_idem, chaos_plain, config
from rpc_tasks import RPCTimeoutError, WebSocketRPCClient

__all__ = ["QUEUE", "Done", "Job", "RPCTimeoutError", "actor", "config", "streams_client"]


def actor(kind: str) -> Any:
    """The ``@rpc_actor`` of a job kind (``plain`` or ``idem``)."""
    return chaos_idem if kind == "idem" else chaos_plain


def streams_client() -> WebSocketRPCClient:
    return WebSocketRPCClient(config())
