"""One call to set a Dramatiq broker up for rpc-tasks: :func:`setup_broker`.

It builds the broker (``BlockingRedisBroker`` for Redis URLs, ``RabbitmqBroker`` for AMQP),
installs the rpc-tasks middleware in the order :mod:`rpc_tasks.middleware.order` describes,
makes :class:`~rpc_tasks.encoder.RPCJSONEncoder` Dramatiq's encoder and sets the broker as
Dramatiq's global one.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.middleware import Retries

from .config import WebSocketRPCConfig, get_config, redact_url
from .exceptions import RPCConfigurationError
from .middleware import RPCIdempotency, RPCRateLimits, RPCReplies, RPCRetries
from .middleware.order import check_broker, middleware_paths
from .redis.topology import is_topology_url

__all__ = [
    "check_broker",
    "install_asyncio",
    "install_encoder",
    "install_middleware",
    "middleware_paths",
    "setup_broker",
]


def install_middleware(broker: dramatiq.Broker, config: WebSocketRPCConfig | None = None) -> dramatiq.Broker:
    """Add rpc-tasks middleware to ``broker`` in the right places (idempotent).

    Dramatiq's ``Retries`` is replaced by ``RPCRetries`` keeping its settings.
    """
    if not any(isinstance(m, RPCRetries) for m in broker.middleware):
        plain = [m for m in broker.middleware if type(m) is Retries]
        retries = RPCRetries()
        if plain:
            old = plain[0]
            retries.max_retries = old.max_retries
            retries.min_backoff = old.min_backoff
            retries.max_backoff = old.max_backoff
            retries.retry_when = old.retry_when
            index = broker.middleware.index(old)
            broker.middleware[index] = retries
            broker.actor_options |= retries.actor_options
        else:
            broker.add_middleware(retries)
    if not any(isinstance(m, RPCReplies) for m in broker.middleware):
        replies = RPCReplies(config)
        if broker.middleware:
            broker.add_middleware(replies, before=type(broker.middleware[0]))
        else:
            broker.add_middleware(replies)
    if not any(isinstance(m, RPCRateLimits) for m in broker.middleware):
        first_after = next(
            (type(m) for m in broker.middleware[broker.middleware.index(_first(broker, RPCReplies)) + 1 :]),
            None,
        )
        limits = RPCRateLimits(config)
        if first_after is not None:
            broker.add_middleware(limits, before=first_after)
        else:
            broker.add_middleware(limits)
    if not any(isinstance(m, RPCIdempotency) for m in broker.middleware):
        broker.add_middleware(RPCIdempotency(config), after=type(_first(broker, RPCRateLimits)))
    install_asyncio(broker)
    return broker


# -- async actors ------------------------------------------------------------------------------


def install_asyncio(broker: dramatiq.Broker) -> dramatiq.Broker:
    """Add Dramatiq's ``AsyncIO`` middleware (the event loop thread that runs ``async def``
    actors) unless the broker has it (idempotent; ``@rpc_actor`` calls it for async actors)."""
    from dramatiq.middleware.asyncio import AsyncIO

    if not any(isinstance(m, AsyncIO) for m in broker.middleware):
        broker.add_middleware(AsyncIO())
    return broker


def _first(broker: dramatiq.Broker, kind: type[Any]) -> Any:
    return next(m for m in broker.middleware if isinstance(m, kind))


def install_encoder() -> None:
    """Make :class:`~rpc_tasks.encoder.RPCJSONEncoder` Dramatiq's encoder, unless the
    application chose a different encoder class (then it is left alone)."""
    from dramatiq.encoder import JSONEncoder

    from .encoder import RPCJSONEncoder

    current = dramatiq.get_encoder()
    if type(current) is JSONEncoder:
        dramatiq.set_encoder(RPCJSONEncoder())


def _broker_from_url(url: str, source: str, config: WebSocketRPCConfig) -> dramatiq.Broker:
    if url.startswith(("amqp://", "amqps://")):
        try:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise RPCConfigurationError("RabbitMQ needs: pip install 'rpc-tasks[rabbitmq]'") from exc
        return RabbitmqBroker(url=url)
    if url.startswith(("redis://", "rediss://", "unix://")) or is_topology_url(url):
        # Sentinel: on the master client a reply channel on the same URL shares (replies go out
        # with the ack); Cluster: refused with what to do instead (issue 18).
        from .redis.broker import ENVELOPE_ROOM_BYTES, redis_broker

        return redis_broker(url, max_message_bytes=config.max_payload_bytes + ENVELOPE_ROOM_BYTES)
    raise RPCConfigurationError(
        f"{source}={redact_url(url)!r} is not a broker URL: it must start with redis://, rediss://, "
        "unix://, redis+sentinel://, amqp:// or amqps:// (e.g. redis://localhost:6379/0)"
    )


def setup_broker(
    broker: dramatiq.Broker | None = None,
    *,
    config: WebSocketRPCConfig | None = None,
    broker_url: str | None = None,
    set_global: bool = True,
    tracing: bool = False,
    metrics: bool = False,
) -> dramatiq.Broker:
    """Return a broker ready for ``@rpc_actor`` and make it Dramatiq's global broker.

    With no ``broker``, one is built from ``broker_url``, else ``$DRAMATIQ_BROKER_URL``, else
    ``config.redis_url`` (``redis``/``rediss``/``unix`` give a
    :class:`~rpc_tasks.redis.broker.BlockingRedisBroker`, ``amqp`` a
    ``RabbitmqBroker``). Replies always travel over Redis at ``config.redis_url``. A built
    ``BlockingRedisBroker`` dead-letters, undecoded, messages over ``config.max_payload_bytes``
    plus 64 KiB of envelope; it requeues a dead worker's messages after its
    ``heartbeat_timeout`` of 10 s (see :mod:`rpc_tasks.redis.broker`).

    ``tracing=True`` adds OpenTelemetry tracing (``rpc-tasks[otel]``), ``metrics=True``
    Prometheus metrics with Dramatiq's own ``Prometheus`` middleware (``rpc-tasks[prometheus]``);
    see :mod:`rpc_tasks.observability`.
    """
    config = config or get_config()
    if broker is None:
        if broker_url:
            url, source = broker_url, "broker_url"
        elif os.environ.get("DRAMATIQ_BROKER_URL"):
            url, source = os.environ["DRAMATIQ_BROKER_URL"], "DRAMATIQ_BROKER_URL"
        else:
            url, source = config.redis_url, "redis_url"
        broker = _broker_from_url(url, source, config)
    install_middleware(broker, config)
    if hasattr(broker, "log_message_params"):
        broker.log_message_params = config.log_rpc_params
    if tracing or metrics:
        from . import observability

        if tracing:
            observability.install_tracing(broker)
        if metrics:
            observability.install_metrics(broker)
    install_encoder()
    if set_global:
        dramatiq.set_broker(broker)
    return broker
