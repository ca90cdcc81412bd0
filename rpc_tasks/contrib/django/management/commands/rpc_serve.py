"""``manage.py rpc_serve [--bridge]``: serve the ``@rpc_method`` handlers of this project.

Without ``--bridge`` it consumes ``request_stream`` (Django as an RPC server); with it,
``bridge_stream`` in the group ``bridge_consumer_name`` (requests browsers send through the
WebSocket server). Stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from rpc_tasks.config import get_config
from rpc_tasks.contrib.django.registry import handlers
from rpc_tasks.streams.server import RPCServer


def _with_db_cleanup(fn: Any) -> Any:
    def run(params: Any) -> Any:
        close_old_connections()
        try:
            return fn(params)
        finally:
            close_old_connections()

    run.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    return run


def build_server(bridge: bool, concurrency: int = 8) -> RPCServer:
    """The RPCServer that ``rpc_serve`` runs (all registered handlers, DB connections managed)."""
    config = get_config()
    server = RPCServer(
        config,
        stream=config.bridge_stream if bridge else None,
        group=config.bridge_consumer_name if bridge else None,
        concurrency=concurrency,
    )
    for handler in handlers.values():
        server.register(
            handler.name,
            _with_db_cleanup(handler.fn),
            params_model=handler.params_model,
            result_model=handler.result_model,
        )
    return server


class Command(BaseCommand):
    help = "Serve the project's @rpc_method handlers from the request stream (or the bridge stream)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bridge", action="store_true", help="consume bridge_stream (browser requests)")
        parser.add_argument("--concurrency", type=int, default=8)

    def handle(self, *args: Any, **options: Any) -> None:
        server = build_server(options["bridge"], options["concurrency"])
        self.stdout.write(
            f"Serving {sorted(server.handlers)} from {server.stream} (group {server.group}) "
            f"as {server.consumer_name}"
        )

        def stop(signum: int, _frame: Any) -> None:
            server.stop(timeout=0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server.serve_forever()
