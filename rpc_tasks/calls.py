"""The sync callers behind ``RPCActor.call`` and ``RPCActor.call_many``: enqueue with a reply
address and a deadline, wait on the reply list, turn replies into results or errors. (The async
twins are in :mod:`rpc_tasks.aio.calls`.)"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from . import protocol
from .enqueue import ENQUEUE_ERRORS as _ENQUEUE_ERRORS
from .exceptions import RPCConnectionError, RPCException, RPCRemoteError, RPCTimeoutError
from .models.errors import RPCError
from .redis.connection import PLAIN_POOLS

#: How far into a queue a timed-out call looks for its message (``LPOS ... MAXLEN``).
_HINT_SCAN = 10_000
#: The longest a timed-out call spends finding out where its message is.
HINT_SECONDS = 0.1

_PENDING: Any = object()


def call(actor: Any, params: Any, timeout: float | None, options: dict[str, Any]) -> Any:
    """``actor.call(params, timeout=..., **options)`` (see :meth:`rpc_tasks.RPCActor.call`)."""

    replies = actor._replies()
    config = replies.config
    timeout = protocol.check_timeout(timeout, config.rpc_timeout)
    started = time.time()
    delay = options.pop("delay", None)
    message = actor.message_with_options(args=(params,), **options)
    channel = replies.channel
    key = channel.key_for(message.message_id)
    deadline = protocol.deadline_from_timeout(timeout, started)
    # The message was just built here and nobody else holds it: add the reply address and
    # deadline in place (a copy costs a dataclass round trip on every call).
    message.options[protocol.OPTION_REPLY_TO] = key
    message.options[protocol.OPTION_DEADLINE] = deadline
    enqueue_and_wait = getattr(actor.broker, "enqueue_and_wait", None)
    if enqueue_and_wait is not None and delay is None:
        # BlockingRedisBroker: enqueue and BLPOP in one round trip.
        try:
            raw = enqueue_and_wait(message, channel, key, deadline - time.time())
        except _ENQUEUE_ERRORS as exc:
            raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc
    else:
        actor._enqueue(message, delay)
        raw = channel.wait(key, deadline - time.time())
    if raw is None:
        raise timeout_error(actor, timeout, message)
    return result_of(actor, protocol.decode_response(raw, max_bytes=config.max_payload_bytes))


def result_of(actor: Any, response: protocol.Response) -> Any:
    """The typed result of a decoded reply to ``actor`` (``RPCRemoteError`` for an error reply);
    shared by the sync and async callers."""
    if not response.success:
        raise RPCRemoteError(response.error or RPCError(message="remote call failed"))
    if actor.result_model is None:
        return None
    return actor.result_model.model_validate(response.result)


def call_many(
    actor: Any,
    params_list: Sequence[Any | Mapping[str, Any]],
    timeout: float | None,
    return_exceptions: bool,
    options: dict[str, Any],
) -> list[Any]:
    """``actor.call_many(...)`` (see :meth:`rpc_tasks.RPCActor.call_many`)."""

    replies = actor._replies()
    config = replies.config
    timeout = protocol.check_timeout(timeout, config.rpc_timeout)
    started = time.time()
    delay = options.pop("delay", None)
    messages = [actor.message_with_options(args=(p,), **options) for p in params_list]
    if not messages:
        return []
    channel = replies.channel
    key = channel.key_for(f"batch-{messages[0].message_id}")
    deadline = protocol.deadline_from_timeout(timeout, started)
    extra = {protocol.OPTION_REPLY_TO: key, protocol.OPTION_DEADLINE: deadline}
    batch = [message.copy(options={**message.options, **extra}) for message in messages]
    enqueue_many = getattr(actor.broker, "enqueue_many", None)
    if enqueue_many is not None and delay is None:
        try:
            enqueue_many(batch)
        except _ENQUEUE_ERRORS as exc:
            raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc
    else:
        for message in batch:
            actor._enqueue(message, delay)
    outcomes, lost = _collect_replies(
        channel,
        key,
        deadline,
        [m.message_id for m in messages],
        config.max_payload_bytes,
        actor.result_model,
    )
    channel.discard(key)
    for i, outcome in enumerate(outcomes):
        if outcome is _PENDING:
            # Redis still unreachable at the deadline: say so rather than "timed out".
            outcomes[i] = lost if lost is not None else RPCTimeoutError(actor.actor_name, timeout)
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, RPCException):
                raise outcome
    return outcomes


def _collect_replies(
    channel: Any, key: str, deadline: float, ids: list[str], max_bytes: int, result_model: Any
) -> tuple[list[Any], RPCConnectionError | None]:
    """``call_many``'s drain: the outcome of each message id (``_PENDING`` if none came by
    ``deadline``) and the connection error that was still going on at the deadline, if any.
    When the reply connection drops, the replies drained so far are kept and the others (still
    in Redis) are waited for on a new connection."""
    index = {message_id: i for i, message_id in enumerate(ids)}
    outcomes: list[Any] = [_PENDING] * len(ids)
    pending = len(ids)
    lost: RPCConnectionError | None = None
    while pending:
        left = deadline - time.time()
        if left <= 0:
            break
        try:
            drained = channel.wait_many(key, left, pending)
        except RPCConnectionError as exc:
            lost = exc
            time.sleep(min(0.05, max(0.0, deadline - time.time())))
            continue
        lost = None
        for raw in drained:
            try:
                response = protocol.decode_response(raw, max_bytes=max_bytes)
            except RPCException:
                continue
            i = index.get(response.correlation_id)
            if i is None or outcomes[i] is not _PENDING:
                continue
            pending -= 1
            if not response.success:
                outcomes[i] = RPCRemoteError(response.error or RPCError(message="remote call failed"))
            elif result_model is None:
                outcomes[i] = None
            else:
                outcomes[i] = result_model.model_validate(response.result)
    return outcomes, lost


def timeout_error(actor: Any, timeout: float, message: Any) -> RPCTimeoutError:
    """The ``RPCTimeoutError`` of a ``.call()`` that got no reply, saying where its message is
    when the broker can tell (one extra round trip, on the timeout path only): still waiting on
    its queue, with or without a live worker (Dramatiq's heartbeats), or taken by a worker."""
    text = f"RPC call to {actor.actor_name!r} timed out after {timeout:g}s"
    hint = _waiting_hint(actor, message)
    return RPCTimeoutError(actor.actor_name, timeout, f"{text}: {hint}" if hint else text)


def _waiting_hint(actor: Any, message: Any) -> str | None:
    broker = actor.broker
    client, namespace = getattr(broker, "client", None), getattr(broker, "namespace", None)
    rid = message.options.get("redis_message_id")
    if client is None or not isinstance(namespace, str) or not isinstance(rid, str):
        return None  # not a Redis broker, or the message went out as a copy
    queue = message.queue_name
    alive_since = int(time.time() * 1000) - int(getattr(broker, "heartbeat_timeout", 60_000))
    pool: Any = getattr(client, "connection_pool", None)
    if type(pool) not in PLAIN_POOLS:
        return None  # Sentinel/Cluster/custom pools: no hint
    # Its own short-lived connection with a short timeout: Redis may be the reason for the
    # timeout (frozen, paused), and the hint must not hold the caller past its deadline.
    kwargs = {
        **pool.connection_kwargs,
        "socket_timeout": HINT_SECONDS,
        "socket_connect_timeout": HINT_SECONDS,
    }
    probe = redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    try:
        with probe.pipeline(transaction=False) as pipe:
            pipe.lpos(f"{namespace}:{queue}", rid, maxlen=_HINT_SCAN)
            pipe.llen(f"{namespace}:{queue}")
            pipe.zcount(f"{namespace}:__heartbeats__", alive_since, "+inf")
            pipe.zscore(f"{namespace}:__heartbeats__", getattr(broker, "broker_id", ""))
            position, length, alive, own = pipe.execute()
    except Exception:  # a hint only: never hide the timeout behind another error
        return None
    finally:
        probe.close()
    # Every process that ran Dramatiq's script lately has a heartbeat: this caller too.
    alive = int(alive) - (1 if own is not None and float(own) >= alive_since else 0)
    if position is None and length < _HINT_SCAN:
        return f"a worker took its message from queue {queue!r} but did not answer in time"
    if not alive:
        return (
            f"its message is still waiting on queue {queue!r} and no worker of this broker is alive "
            "(start one: dramatiq <the module that declares the actor>)"
        )
    return (
        f"its message is still waiting on queue {queue!r} ({length} message(s) there); {alive} "
        f"other process(es) of this broker are alive but no worker took it: do the workers consume "
        f"queue {queue!r} and import the module that declares {actor.actor_name!r}?"
    )
