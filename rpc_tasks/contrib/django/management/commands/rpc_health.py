"""``manage.py rpc_health``: check Redis for replies, the Dramatiq broker and (unless
``--skip-server``) that a server answers ``ping``. Exit code 0 when everything passed, 1 if not."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from rpc_tasks.config import get_config
from rpc_tasks.redis.connection import client_from_config
from rpc_tasks.redis.replies import ReplyChannel
from rpc_tasks.streams.client import WebSocketRPCClient


class Command(BaseCommand):
    help = "Check the RPC set-up; exit 0 when healthy, 1 otherwise."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for ping")
        parser.add_argument(
            "--skip-server", action="store_true", help="do not require a server to answer ping"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = get_config()
        results: list[tuple[str, bool, str]] = []
        redis_ok = ReplyChannel(client_from_config(config)).ping()
        results.append(("redis (replies)", redis_ok, config.redacted()["redis_url"]))
        try:
            import dramatiq

            broker = dramatiq.get_broker()
            from rpc_tasks.middleware.order import check_broker

            problems = check_broker(broker)
            results.append(
                (
                    "dramatiq broker",
                    not problems,
                    type(broker).__name__ + ("" if not problems else ": " + "; ".join(problems)),
                )
            )
        except Exception as exc:  # pragma: no cover - reported, not raised
            results.append(("dramatiq broker", False, str(exc)))
        if not options["skip_server"]:
            ok = redis_ok and WebSocketRPCClient(config).health_check(timeout=options["timeout"])
            results.append(("server ping", ok, f"{config.request_stream} / {config.consumer_group}"))
        for name, ok, detail in results:
            self.stdout.write(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}")
        healthy = all(ok for _, ok, _ in results)
        self.stdout.write("healthy" if healthy else "unhealthy")
        sys.exit(0 if healthy else 1)
