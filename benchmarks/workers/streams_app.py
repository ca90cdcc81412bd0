"""Streams path, server side: an ``RPCServer`` with its built-in ``echo`` method.

    rpc-tasks serve --app benchmarks.workers.streams_app:make_server --concurrency 4

(run as ``python -m rpc_tasks.cli ...`` by ``benchmarks.run``). Stream, group and reply prefix
come from ``BENCH_TAG``; Redis from ``BENCH_REDIS_URL``.
"""

from __future__ import annotations

from benchmarks.common import Names, names, redis_url
from rpc_tasks import RPCServer, WebSocketRPCConfig


def config(n: Names | None = None, url: str | None = None) -> WebSocketRPCConfig:
    """The settings both the server and the benchmark client use."""
    n = n or names()
    return WebSocketRPCConfig(
        redis_url=url or redis_url(),
        request_stream=n.streams_stream,
        consumer_group=n.group,
        response_key_prefix=n.streams_reply_prefix,
        rpc_timeout=10,
    )


def make_server() -> RPCServer:
    return RPCServer(config(), consumer_name="bench-1")
