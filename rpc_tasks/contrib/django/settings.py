"""Settings helpers for django-dramatiq."""

from __future__ import annotations

import os
from typing import Any

from ...middleware.order import middleware_paths

#: Value for ``DRAMATIQ_ENCODER``: Dramatiq's JSON encoder plus salvage of invalid messages.
DRAMATIQ_ENCODER = "rpc_tasks.encoder.RPCJSONEncoder"

_BROKERS = ("redis", "rabbitmq")


def dramatiq_broker_settings(
    url: str | None = None,
    *,
    broker: str | None = None,
    options: dict[str, Any] | None = None,
    admin: bool = False,
    extra_middleware: list[str] | None = None,
) -> dict[str, Any]:
    """``DRAMATIQ_BROKER`` for django-dramatiq with rpc-tasks' middleware in place::

        DRAMATIQ_BROKER = dramatiq_broker_settings("redis://localhost:6379/0")
        DRAMATIQ_ENCODER = rpc_tasks.contrib.django.DRAMATIQ_ENCODER

    ``broker`` is ``"redis"`` or ``"rabbitmq"`` (default: from the URL scheme). The middleware
    list is explicit, so django-dramatiq's built-in default (which names
    ``dramatiq.middleware.Prometheus``, gone in Dramatiq 2.x) is never used. Django DB
    connections are handled by ``django_dramatiq.middleware.DbConnectionsMiddleware``;
    ``admin=True`` adds django-dramatiq's ``AdminMiddleware`` (task table in the admin).
    """
    url = url or os.environ.get("DRAMATIQ_BROKER_URL") or "redis://localhost:6379/0"
    kind = broker or ("rabbitmq" if url.startswith(("amqp://", "amqps://")) else "redis")
    if kind not in _BROKERS:
        raise ValueError(f"broker must be 'redis' or 'rabbitmq', not {kind!r}")
    middleware = [*middleware_paths(), "django_dramatiq.middleware.DbConnectionsMiddleware"]
    if admin:
        middleware.append("django_dramatiq.middleware.AdminMiddleware")
    middleware.extend(extra_middleware or [])
    if kind == "redis":
        from ...redis.broker import redis_broker_path

        path = redis_broker_path()
    else:
        path = "dramatiq.brokers.rabbitmq.RabbitmqBroker"
    return {"BROKER": path, "OPTIONS": {"url": url, **(options or {})}, "MIDDLEWARE": middleware}
