"""The only module of rpc-tasks that touches Dramatiq's private names, and the check, at import,
that they still have the shape :class:`~rpc_tasks.redis.broker.BlockingRedisBroker` was written
against (:data:`INTERNALS_PROBLEM`). Everything else (the broker, its consumer, the wrapped
dispatch script) gets them from here; when the check fails, ``setup_broker()`` falls back to
Dramatiq's plain ``RedisBroker`` with one warning instead of breaking workers."""

from __future__ import annotations

import inspect
from typing import Any

from dramatiq.brokers import redis as _dramatiq_redis
from dramatiq.brokers.redis import RedisBroker


def internals_problem() -> str | None:
    """What no longer has the shape this module relies on, or ``None``.

    The Dramatiq private names rpc-tasks relies on: the Redis consumer class
    ``_RedisConsumer`` (and its ``message_cache`` / ``queued_message_ids`` /
    ``outstanding_message_count``), the ``_scripts`` dict with ``dispatch.lua`` and the
    argument layout of that script (``command, timestamp, queue_name, worker_id,
    heartbeat_timeout, dead_message_ttl, do_maintenance, max_unpack_size, ...``), and
    ``RedisBroker._should_do_maintenance`` / ``_max_unpack_size``."""
    consumer: Any = getattr(_dramatiq_redis, "_RedisConsumer", None)
    if not isinstance(consumer, type):
        return "dramatiq.brokers.redis._RedisConsumer is gone"
    init: Any = vars(consumer).get("__init__")
    try:
        params = list(inspect.signature(init).parameters)
    except (TypeError, ValueError):
        return "_RedisConsumer.__init__ cannot be inspected"
    if params != ["self", "broker", "queue_name", "prefetch", "timeout"]:
        return f"_RedisConsumer.__init__ takes {params[1:]}"
    if not isinstance(inspect.getattr_static(consumer, "outstanding_message_count", None), property):
        return "_RedisConsumer.outstanding_message_count is not a property"
    try:
        source = inspect.getsource(init)
    except (OSError, TypeError):
        source = "self.message_cache self.queued_message_ids"  # no source shipped: trust the rest
    if "self.message_cache" not in source or "self.queued_message_ids" not in source:
        return "_RedisConsumer no longer keeps message_cache / queued_message_ids"
    scripts = getattr(_dramatiq_redis, "_scripts", None)
    dispatch = scripts.get("dispatch") if isinstance(scripts, dict) else None
    if isinstance(dispatch, str):
        dispatch = dispatch.encode()
    if not isinstance(dispatch, bytes):
        return "dramatiq.brokers.redis._scripts['dispatch'] is gone"
    for line in (
        b"local command = ARGV[1]",
        b"local queue_name = ARGV[3]",
        b"local max_unpack_size = ARGV[8]",
    ):
        if line not in dispatch:
            return f"dispatch.lua no longer has {line.decode()!r}"
    for name in ("_should_do_maintenance", "_max_unpack_size", "_dispatch"):
        if not callable(getattr(RedisBroker, name, None)):
            return f"RedisBroker.{name} is gone"
    return None


#: Why ``BlockingRedisBroker`` cannot run on the installed Dramatiq (``None``: it can).
INTERNALS_PROBLEM = internals_problem()

#: Dramatiq's Redis consumer class (``object`` when it is gone: nothing subclasses it then).
RedisConsumerBase: type[Any] = getattr(_dramatiq_redis, "_RedisConsumer", object)


def dispatch_script() -> bytes:
    """The source of Dramatiq's ``dispatch.lua``, as installed."""
    body = _dramatiq_redis._scripts["dispatch"]
    return body.encode() if isinstance(body, str) else bytes(body)


def maintenance_flag(broker: RedisBroker, command: str) -> int:
    """Dramatiq's per-command maintenance draw (1: run maintenance in this script call)."""
    return int(broker._should_do_maintenance(command))


def max_unpack_size(broker: RedisBroker) -> int:
    """Dramatiq's cap on values unpacked at once in its scripts."""
    return int(broker._max_unpack_size())  # type: ignore[no-untyped-call]


def max_unpack_size_known(broker: RedisBroker) -> bool:
    """Whether :func:`max_unpack_size` answers without asking Redis (Dramatiq asks once per
    broker class, on its first enqueue, with the broker's sync client)."""
    return getattr(type(broker), "_max_unpack_size_val", None) is not None
