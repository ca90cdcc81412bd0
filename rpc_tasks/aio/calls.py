"""``await actor.acall()``, ``acall_many()`` and ``asend()``: the async twins of ``call``,
``call_many`` and ``send``.

They build messages with the actor's own methods (params validation, size limit, options),
add the same reply address and deadline options, and raise the same errors; only the waiting
differs. Replies come through the loop's :class:`~rpc_tasks.aio.replies.ReplyReader`; the
enqueue depends on the broker:

* :class:`~rpc_tasks.redis.broker.BlockingRedisBroker` (the default): its enqueue script runs on
  ``redis.asyncio`` (:meth:`~rpc_tasks.redis.broker.BlockingRedisBroker.enqueue_command` gives
  the command), pipelined with the loop's other commands; with the replies on the same Redis, a
  lone call's enqueue and its reply's ``BLPOP`` go out in one write.
* any other broker (Dramatiq's ``RedisBroker``, ``RabbitmqBroker``, whose pika client is
  synchronous), a message with a ``delay``, or a Redis the async client cannot mirror
  (Sentinel): the broker's own ``enqueue`` runs in the loop's default thread-pool executor,
  so the loop never blocks (and the executor's size bounds how many enqueues run at once).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import dramatiq
from dramatiq.asyncio import async_to_sync
from dramatiq.errors import ConnectionClosed, ConnectionFailed
from redis.exceptions import NoScriptError, RedisError

from .. import calls as sync_calls
from .. import protocol
from ..exceptions import RPCConnectionError, RPCException, RPCRemoteError, RPCTimeoutError
from ..redis import internals
from ..redis.connection import same_redis
from ..redis.replies import ReplyChannel
from . import threaded
from .connection import CommandPipe, ConnectionSpec, loop_local, loop_local_peek
from .lane import FastLane, FirstCommandFailed
from .replies import ReplyReader, stop_waiting_for

#: An :class:`rpc_tasks.RPCActor` (not imported: ``rpc_tasks.actor`` imports this module).
Actor = Any

_ENQUEUE_ERRORS = (ConnectionClosed, ConnectionFailed, RedisError, OSError)


def reader_for(channel: ReplyChannel) -> ReplyReader:
    """The running loop's reply reader for ``channel``'s Redis."""

    def build() -> ReplyReader:
        spec = ConnectionSpec.like(channel.client)
        if spec is None:
            raise RPCConnectionError(
                "async calls need a plain redis-py client for the replies (host/port or unix "
                "socket pool); this one's pool does not say which server it talks to"
            )
        return ReplyReader(spec, prefix=channel.prefix, max_bytes=channel.max_bytes)

    reader: ReplyReader = loop_local(("reader", channel), build)
    return reader


def _broker_pipe(broker: dramatiq.Broker, channel: ReplyChannel) -> CommandPipe | None:
    """The pipe that runs ``broker``'s enqueue command on this loop, or ``None`` (use a thread).
    Worked out once per loop, broker and channel."""

    def build() -> CommandPipe | bool:
        client = getattr(broker, "client", None)
        if not callable(getattr(broker, "enqueue_command_of", None)) or client is None:
            return False
        if same_redis(client, channel.client):
            return False if threaded.needs_thread(channel) else reader_for(channel).pipe
        spec = ConnectionSpec.like(client)
        return False if spec is None else CommandPipe(spec)

    pipe = loop_local(("pipe", broker, channel), build)
    return pipe if isinstance(pipe, CommandPipe) else None


async def _enqueue(
    actor: Actor, message: dramatiq.Message[Any], delay: Any, pipe: CommandPipe | None
) -> dramatiq.Message[Any]:
    """Enqueue a freshly built message without blocking the loop; errors as the sync path's."""
    if pipe is None or delay is not None:
        loop = asyncio.get_running_loop()
        # In this task's context (run_in_executor does not copy it): before_enqueue hooks see
        # the caller's span (tracing) and any other context variable, as on the loop's path.
        run = contextvars.copy_context().run
        return await loop.run_in_executor(None, run, actor._enqueue, message, delay)
    return await _finish(actor, message, _submit(actor, message, pipe))


def _submit(
    actor: Actor,
    message: dramatiq.Message[Any],
    pipe: CommandPipe,
    *,
    admitted: bool = False,
    prepared: bool = False,
) -> asyncio.Future[Any]:
    """Queue the broker's enqueue command of ``message`` on ``pipe`` (runs the before-enqueue
    hooks now, unless ``prepared``: :func:`_prepare` ran them); ``admitted``: the caller waited
    for room on ``pipe``."""
    try:
        broker: Any = actor.broker  # a BlockingRedisBroker (see _broker_pipe)
        if not prepared:
            broker.prepare_enqueue(message)
        # Encoded when the pipe sends it: queued calls hold no encoded copy meanwhile (and
        # share one bound method, rather than holding one each).
        build = loop_local(("command_of", broker), lambda: broker.enqueue_command_of)
    except BaseException as exc:
        if admitted:
            pipe.pass_turn()
        if isinstance(exc, _ENQUEUE_ERRORS):
            raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc
        raise
    return pipe.submit_deferred(build, message, admitted=admitted)


def _prepare(actor: Actor, message: dramatiq.Message[Any]) -> None:
    """:func:`_submit`'s before-enqueue hooks alone (errors as ``_submit``'s)."""
    try:
        actor.broker.prepare_enqueue(message)
    except _ENQUEUE_ERRORS as exc:
        raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc


async def _warm(actor: Actor, left: float | None, timeout: float = 0.0) -> None:
    """Dramatiq asks Redis for its Lua stack size on the first enqueue of a process, with the
    broker's sync client: ask it from the executor (within ``timeout`` s), not from the loop,
    which a slow or frozen Redis would block. Then the command builds without Redis.
    ``left``: seconds the call has left (``None``: no deadline); ``timeout``: the call's own."""
    if internals.max_unpack_size_known(actor.broker):
        return
    loop = asyncio.get_running_loop()
    asking = loop.run_in_executor(None, internals.max_unpack_size, actor.broker)
    try:
        await asyncio.wait_for(asking, left)
    except asyncio.TimeoutError:
        raise RPCTimeoutError(actor.actor_name, timeout) from None
    except _ENQUEUE_ERRORS as exc:
        raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc


def _crowded_pipe(broker: dramatiq.Broker, channel: ReplyChannel) -> CommandPipe | None:
    """This loop's pipe for ``broker``'s enqueues if it is crowded (so many commands queued
    that a new call should wait for room before it builds its message), else ``None``."""
    pipe = loop_local_peek(("pipe", broker, channel))
    return pipe if isinstance(pipe, CommandPipe) and pipe.crowded else None


async def _finish(
    actor: Actor, message: dramatiq.Message[Any], future: asyncio.Future[Any]
) -> dramatiq.Message[Any]:
    """Wait for a submitted enqueue, then run the after-enqueue hooks."""
    broker: Any = actor.broker
    try:
        try:
            await future
        except NoScriptError:  # the server lost its script cache: the sync enqueue loads it
            loop = asyncio.get_running_loop()
            rid = message.options["redis_message_id"]
            data = message.encode()
            await loop.run_in_executor(None, broker.do_enqueue, message.queue_name, rid, data)
    except _ENQUEUE_ERRORS as exc:
        raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc
    broker.emit_after("enqueue", message, None)
    return message


def _expire(
    futures: Sequence[asyncio.Future[Any]],
    method: str,
    timeout: float,
    enqueues: Sequence[asyncio.Future[Any]] = (),
) -> None:
    """The deadline: waiting replies, and enqueues not yet confirmed (a frozen Redis), fail
    with ``RPCTimeoutError``."""
    for future in (*futures, *enqueues):
        if not future.done():
            future.set_exception(RPCTimeoutError(method, timeout))


async def acall(actor: Actor, params: Any, timeout: float | None, options: dict[str, Any]) -> Any:
    """See :meth:`rpc_tasks.RPCActor.acall`."""
    replies = actor._replies()
    config = replies.config
    timeout = protocol.check_timeout(timeout, config.rpc_timeout)
    if threaded.needs_thread(replies.channel):  # Sentinel, Cluster: the sync call in a thread
        call = functools.partial(_sync_call, actor, params, options)
        return await threaded.run_sync_call(actor.actor_name, timeout, call)
    started = time.time()
    delay = options.pop("delay", None)
    gate = None if delay is not None else _crowded_pipe(actor.broker, replies.channel)
    if gate is not None:  # thousands of calls at once: build the message when there is room
        if not await gate.wait_for_room(started + timeout - time.time()):
            raise RPCTimeoutError(actor.actor_name, timeout)  # not admitted: nothing owed
    try:
        message = actor.message_with_options(args=(params,), **options)
        channel = replies.channel
        pipe = _broker_pipe(actor.broker, channel)
        reader = reader_for(channel)
        deadline = protocol.deadline_from_timeout(timeout, started)
        if pipe is not None and delay is None:
            await _warm(actor, deadline - time.time(), timeout)
        if gate is not None and time.time() >= deadline:  # the wait took all its time
            raise RPCTimeoutError(actor.actor_name, timeout)
        lane = lane_for(channel)
        if gate is None and pipe is reader.pipe and delay is None and not reader.waiting and not lane.busy:
            return await _lone_call(actor, message, channel, lane, timeout, deadline)
    except BaseException:
        if gate is not None:
            gate.pass_turn()
        raise
    correlation_id = message.message_id
    loop = asyncio.get_running_loop()
    # The reader fails the future at the deadline (one timer per reader, not one per call).
    expires = (loop.time() + (deadline - time.time()), actor.actor_name, timeout)
    future = reader.expect(correlation_id, expires)
    message.options[protocol.OPTION_REPLY_TO] = reader.inbox
    message.options[protocol.OPTION_DEADLINE] = deadline
    del params, expires, options
    try:
        if pipe is None or delay is not None:
            await _enqueue(actor, message, delay, pipe)
        else:
            # _enqueue's work inlined: no coroutine (and frame) per call for the common path.
            enqueued = _submit(actor, message, pipe, admitted=gate is not None)
            # The deadline (or a lost reply connection) ends the wait for the enqueue too, so
            # that a frozen Redis cannot hold the call past it.
            stop = None if enqueued.done() else stop_waiting_for(enqueued)
            if stop is not None:
                future.add_done_callback(stop)
            try:
                await enqueued
            except _ENQUEUE_ERRORS:
                await _finish(actor, message, enqueued)  # NoScriptError fallback, or the error
            else:
                actor.broker.emit_after("enqueue", message, None)
            finally:
                if stop is not None:
                    future.remove_done_callback(stop)
            del enqueued, stop
        del message  # only the reply is left to wait for: free the request meanwhile
        response = await future
    finally:
        reader.forget(correlation_id)
        if future.done() and not future.cancelled():
            future.exception()  # retrieved (e.g. a timeout while the enqueue failed)
    return sync_calls.result_of(actor, response)


def _sync_call(actor: Actor, params: Any, options: dict[str, Any], left: float) -> Any:
    return sync_calls.call(actor, params, left, options)


def lane_for(channel: ReplyChannel) -> FastLane:
    """The running loop's fast lane to ``channel``'s Redis."""
    lane: FastLane = loop_local(("lane", channel), lambda: FastLane(reader_for(channel).spec))
    return lane


async def _lone_call(
    actor: Actor,
    message: dramatiq.Message[Any],
    channel: ReplyChannel,
    lane: FastLane,
    timeout: float,
    deadline: float,
) -> Any:
    """A call nothing else waits alongside: enqueue, ``BLPOP`` and ``DEL`` of its own reply key
    in one write on the fast lane (as the sync ``.call()`` does; see :mod:`rpc_tasks.aio.lane`)."""
    broker: Any = actor.broker
    key = channel.key_for(message.message_id)
    message.options[protocol.OPTION_REPLY_TO] = key
    message.options[protocol.OPTION_DEADLINE] = deadline
    try:
        command = broker.enqueue_command(message)  # Dramatiq may ask Redis (its Lua stack size)
    except _ENQUEUE_ERRORS as exc:
        raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc
    try:
        try:
            raw = await lane.request(
                command, key, deadline - time.time(), lambda _: broker.emit_after("enqueue", message, None)
            )
        except FirstCommandFailed as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise RPCConnectionError(f"could not enqueue {actor.actor_name!r}: {exc}") from exc.__cause__
            # The server lost its script cache: the sync enqueue loads it, then wait as usual.
            # The lane stays this call's meanwhile (another call would share its connection).
            lane.busy = True
            try:
                await _finish(actor, message, _failed(exc.__cause__))
            finally:
                lane.busy = False
            raw = await lane.request(None, key, deadline - time.time())
    except (RedisError, OSError) as exc:
        raise RPCConnectionError(f"lost Redis while waiting for a reply: {exc}") from exc
    if raw is None:
        raise RPCTimeoutError(actor.actor_name, timeout)
    return sync_calls.result_of(actor, protocol.decode_response(raw, max_bytes=channel.max_bytes))


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


async def acall_many(
    actor: Actor,
    params_list: Sequence[Any | Mapping[str, Any]],
    timeout: float | None,
    return_exceptions: bool,
    options: dict[str, Any],
) -> list[Any]:
    """See :meth:`rpc_tasks.RPCActor.acall_many`."""
    replies = actor._replies()
    config = replies.config
    timeout = protocol.check_timeout(timeout, config.rpc_timeout)
    if threaded.needs_thread(replies.channel):  # Sentinel, Cluster: the sync call in a thread
        return await threaded.run_sync_call(
            actor.actor_name,
            timeout,
            lambda left: sync_calls.call_many(actor, params_list, left, return_exceptions, options),
        )
    started = time.time()
    delay = options.pop("delay", None)
    messages = [actor.message_with_options(args=(p,), **options) for p in params_list]
    if not messages:
        return []
    channel = replies.channel
    pipe = _broker_pipe(actor.broker, channel)
    reader = reader_for(channel)
    deadline = protocol.deadline_from_timeout(timeout, started)
    if pipe is not None and delay is None:
        await _warm(actor, deadline - time.time(), timeout)
    futures = [reader.expect(m.message_id) for m in messages]
    for message in messages:
        message.options[protocol.OPTION_REPLY_TO] = reader.inbox
        message.options[protocol.OPTION_DEADLINE] = deadline
    loop = asyncio.get_running_loop()
    submitted: list[asyncio.Future[Any]] = []  # filled below; the timer fails what is pending
    when = loop.time() + (deadline - time.time())
    timer = loop.call_at(when, _expire, futures, actor.actor_name, timeout, submitted)
    outcomes: list[Any] = []
    try:
        if pipe is not None and delay is None:
            # Every before-enqueue hook first, as enqueue_many: one that raises sends nothing.
            for message in messages:
                _prepare(actor, message)
            # Every enqueue queued at once: the pipe sends them in a few writes, no task each.
            submitted.extend(_submit(actor, m, pipe, prepared=True) for m in messages)
            for message, enqueued in zip(messages, submitted, strict=True):
                try:
                    await _finish(actor, message, enqueued)
                except RPCTimeoutError:
                    break  # the deadline passed first: every reply future holds its timeout
        else:
            await asyncio.gather(*(_enqueue(actor, m, delay, pipe) for m in messages))
        for future in futures:
            try:
                outcomes.append(sync_calls.result_of(actor, await future))
            except (RPCRemoteError, RPCTimeoutError) as exc:
                outcomes.append(exc)
    finally:
        timer.cancel()
        for message in messages:
            reader.forget(message.message_id)
        for future in [*futures, *submitted]:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warnings
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, RPCException):
                raise outcome
    return outcomes


async def asend(actor: Actor, params: Any, options: dict[str, Any]) -> dramatiq.Message[Any]:
    """See :meth:`rpc_tasks.RPCActor.asend`."""
    delay = options.pop("delay", None)
    message = actor.message_with_options(args=(params,), **options)
    try:
        channel: ReplyChannel | None = actor._replies().channel
    except RPCException:
        channel = None  # no reply middleware: fine for a send, enqueued from a thread
    pipe = None if channel is None else _broker_pipe(actor.broker, channel)
    if pipe is not None and delay is None:
        await _warm(actor, None)
    return await _enqueue(actor, message, delay, pipe)


async def _probe() -> None:  # pragma: no cover - never awaited
    return None


#: The code of Dramatiq's ``async_to_sync`` wrapper (the same for every wrapped function).
_WRAPPER_CODE = getattr(async_to_sync(_probe), "__code__", None)


def coroutine_function(actor: Actor) -> Callable[..., Awaitable[Any]] | None:
    """The ``async def`` function of an async actor (Dramatiq wraps it with ``async_to_sync``
    to run it on the ``AsyncIO`` middleware's loop thread); ``None`` for a plain actor."""
    fn: Any = actor.fn
    if inspect.iscoroutinefunction(fn):
        return cast("Callable[..., Awaitable[Any]]", fn)
    wrapped = getattr(fn, "__wrapped__", None)
    if getattr(fn, "__code__", None) is _WRAPPER_CODE and inspect.iscoroutinefunction(wrapped):
        return cast("Callable[..., Awaitable[Any]]", wrapped)
    return None


async def run_directly(actor: Actor, params: Any) -> Any:
    """``await actor(params)`` outside a worker: validate, await the function, check the result."""
    fn = coroutine_function(actor)
    if fn is None:  # pragma: no cover - only called for async actors
        raise TypeError(f"{actor.actor_name} is not an async actor")
    return actor._coerce_result(await fn(actor.validate_params(params)))
