"""One call to set a Dramatiq broker up for rpc-tasks, and a checker for hand-made set-ups.

Required middleware and order:

* ``middleware.RPCReplies`` first, so that expired ``.call()`` messages are skipped and unknown
  actors are failed before any other middleware does work for them;
* ``middleware.RPCRateLimits`` right after it, so a message for a cooling-down key is put back
  before anything else runs;
* ``middleware.RPCRetries`` *instead of* ``dramatiq.middleware.Retries`` (same options), so
  non-retryable RPC errors fail at once.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.middleware import Retries

from .config import WebSocketRPCConfig, get_config
from .exceptions import RPCConfigurationError

#: Dotted paths of rpc-tasks middleware, for django-dramatiq's ``MIDDLEWARE`` setting.
REPLIES_PATH = "middleware.RPCReplies"
RATE_LIMITS_PATH = "middleware.RPCRateLimits"
RETRIES_PATH = "middleware.RPCRetries"

#: Dramatiq 2.x's default middleware, minus ``Retries`` (replaced by ``RPCRetries``).
#: ``dramatiq.middleware.Prometheus`` is deliberately absent: it does not import under 2.x.
_DRAMATIQ_DEFAULTS = [
    "dramatiq.middleware.AgeLimit",
    "dramatiq.middleware.TimeLimit",
    "dramatiq.middleware.ShutdownNotifications",
    "dramatiq.middleware.Callbacks",
    "dramatiq.middleware.Pipelines",
]


def middleware_paths(extra: list[str] | None = None) -> list[str]:
    """Full middleware list (dotted paths) in the right order, e.g. for django-dramatiq::

    DRAMATIQ_BROKER = {
        "BROKER": "rpc_tasks.brokers.BlockingRedisBroker",
        "OPTIONS": {"url": "redis://localhost:6379/0"},
        "MIDDLEWARE": rpc_tasks.middleware_paths(),
    }
    """
    return [REPLIES_PATH, RATE_LIMITS_PATH, *_DRAMATIQ_DEFAULTS, RETRIES_PATH, *(extra or [])]


def install_middleware(broker: dramatiq.Broker, config: WebSocketRPCConfig | None = None) -> dramatiq.Broker:
    """Add rpc-tasks middleware to ``broker`` in the right places (idempotent).

    Dramatiq's ``Retries`` is replaced by ``RPCRetries`` keeping its settings.
    """
    from middleware.ratelimits import RPCRateLimits
    from middleware.replies import RPCReplies
    from middleware.retries import RPCRetries

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


def _broker_from_url(url: str) -> dramatiq.Broker:
    if url.startswith(("amqp://", "amqps://")):
        try:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise RPCConfigurationError("RabbitMQ needs: pip install 'rpc-tasks[rabbitmq]'") from exc
        return RabbitmqBroker(url=url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .brokers import BlockingRedisBroker

        return BlockingRedisBroker(url=url)
    raise RPCConfigurationError(
        "broker URL must start with redis://, rediss://, unix://, amqp:// or amqps://"
    )


def setup_broker(
    broker: dramatiq.Broker | None = None,
    *,
    config: WebSocketRPCConfig | None = None,
    broker_url: str | None = None,
    set_global: bool = True,
) -> dramatiq.Broker:
    """Return a broker ready for ``@rpc_actor`` and make it Dramatiq's global broker.

    With no ``broker``, one is built from ``broker_url``, else ``$DRAMATIQ_BROKER_URL``, else
    ``config.redis_url`` (``redis``/``rediss``/``unix`` give a
    :class:`~rpc_tasks.brokers.BlockingRedisBroker`, ``amqp`` a
    ``RabbitmqBroker``). Replies always travel over Redis at ``config.redis_url``.
    """
    config = config or get_config()
    if broker is None:
        url = broker_url or os.environ.get("DRAMATIQ_BROKER_URL") or config.redis_url
        broker = _broker_from_url(url)
    install_middleware(broker, config)
    install_encoder()
    if set_global:
        dramatiq.set_broker(broker)
    return broker


def check_broker(broker: dramatiq.Broker) -> list[str]:
    """Problems with a broker's rpc-tasks set-up, as human-readable strings (empty if fine)."""
    from middleware.ratelimits import RPCRateLimits
    from middleware.replies import RPCReplies
    from middleware.retries import RPCRetries

    problems: list[str] = []
    kinds: list[Any] = [type(m) for m in broker.middleware]
    if RPCReplies not in kinds:
        problems.append("RPCReplies middleware is missing: .call() would never get a reply")
    elif kinds.index(RPCReplies) != 0:
        problems.append("RPCReplies should be the first middleware (it skips expired calls early)")
    if RPCRateLimits not in kinds:
        problems.append("RPCRateLimits middleware is missing: rate-limit errors will not cool the fleet down")
    elif RPCReplies in kinds and kinds.index(RPCRateLimits) < kinds.index(RPCReplies):
        problems.append("RPCRateLimits must come after RPCReplies")
    if Retries in kinds:
        problems.append(
            "dramatiq.middleware.Retries is installed: replace it with middleware.RPCRetries "
            "(same options) so non-retryable errors fail at once"
        )
    if RPCRetries not in kinds:
        problems.append("RPCRetries middleware is missing")
    elif kinds.count(RPCRetries) > 1:
        problems.append("RPCRetries is installed more than once")
    return problems
