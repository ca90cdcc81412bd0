"""``@rpc_actor``: a Dramatiq actor with typed params/result, ``.send()`` and ``.call()``.

The decorated object is a real :class:`dramatiq.Actor` (workers, middleware, the ``dramatiq``
CLI and django-dramatiq's autodiscovery all see it). On the wire its message carries one
positional argument: the params model dumped to JSON. ``.call()`` adds two message options, the
reply address and the caller's deadline (see :mod:`rpc_tasks.protocol`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar, cast, overload

import dramatiq
from pydantic import BaseModel, ValidationError

from . import calls as _calls
from . import context, metrics, protocol
from .aio import calls as _aio_calls
from .enqueue import enqueue_retrying
from .exceptions import (
    RPCConfigurationError,
    RPCException,
    RPCRemoteError,
)
from .middleware.idempotency import STORED_RESULT
from .middleware.replies import RPCReplies
from .models.errors import RPCError, RPCErrorCode

logger = logging.getLogger(__name__)

TParams = TypeVar("TParams", bound=BaseModel)
TResult = TypeVar("TResult", bound="BaseModel | None")


def find_replies_middleware(broker: dramatiq.Broker) -> RPCReplies:
    """The broker's :class:`~rpc_tasks.middleware.RPCReplies`; raises ``RPCConfigurationError``
    if absent."""
    for mw in broker.middleware:
        if isinstance(mw, RPCReplies):
            return mw
    raise RPCConfigurationError(
        f"The broker {type(broker).__name__} has no rpc-tasks middleware (RPCReplies), so its "
        "messages would never be answered. Call rpc_tasks.setup_broker() before declaring "
        "@rpc_actor functions (or setup_broker(broker) for a broker you built; with "
        "django-dramatiq, DRAMATIQ_BROKER = rpc_tasks.contrib.django.dramatiq_broker_settings(url))."
    )


class RPCActor(dramatiq.Actor[Any, Any], Generic[TParams, TResult]):
    """A Dramatiq actor whose function takes one Pydantic params model and returns a model.

    Use :func:`rpc_actor` to create one. Besides everything a Dramatiq actor does:

    * :meth:`send` validates params before enqueueing and returns the Dramatiq ``Message``;
    * :meth:`call` enqueues, waits for the typed result and returns it;
    * calling the actor directly (``echo(params)``) runs the function in-process.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        actor_name: str,
        queue_name: str,
        priority: int,
        broker: dramatiq.Broker,
        options: dict[str, Any],
        params_model: type[TParams],
        result_model: type[BaseModel] | None,
    ) -> None:
        self.params_model: type[TParams] = params_model
        self.result_model: type[BaseModel] | None = result_model
        super().__init__(
            fn,
            actor_name=actor_name,
            queue_name=queue_name,
            priority=priority,
            broker=broker,
            options=options,
        )

    # -- validation ----------------------------------------------------------------------------

    def validate_params(self, params: TParams | Mapping[str, Any]) -> TParams:
        """Validate ``params`` (a model instance or a mapping); raises ``ValidationError``."""
        return self.params_model.model_validate(params)

    def _payload(self, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        if kwargs or len(args) != 1:
            raise TypeError(
                f"{self.actor_name}: RPC actors take exactly one params argument "
                f"({self.params_model.__name__}), got {len(args)} positional and "
                f"{len(kwargs or {})} keyword arguments"
            )
        payload: dict[str, Any] = self.validate_params(args[0]).model_dump(mode="json")
        limit = self._max_payload_bytes()
        protocol.dumps(payload, max_bytes=limit, what=f"params of {self.actor_name}")
        return payload

    def _max_payload_bytes(self) -> int | None:
        try:
            return self._replies().config.max_payload_bytes
        except RPCConfigurationError:
            return None

    def _coerce_result(self, value: Any) -> Any:
        if self.result_model is None:
            return None
        if isinstance(value, self.result_model):
            return value
        try:
            return self.result_model.model_validate(value)
        except ValidationError as exc:
            raise RPCRemoteError(
                RPCError(
                    code=RPCErrorCode.INTERNAL_ERROR,
                    message=f"actor {self.actor_name!r} returned a value that is not a valid "
                    f"{self.result_model.__name__}: {exc.error_count()} error(s)",
                    details={"errors": protocol.validation_error_details(exc)},
                )
            ) from exc

    # -- Dramatiq API, validated ---------------------------------------------------------------

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """Build a message after validating and serializing the params model."""
        payload = self._payload(args, kwargs)
        return super().message_with_options(args=(payload,), kwargs={}, **options)

    def message(self, params: TParams | Mapping[str, Any]) -> dramatiq.Message[Any]:  # type: ignore[override,unused-ignore]
        """Build (but do not send) a message for ``params``."""
        return self.message_with_options(args=(params,))

    def send(self, params: TParams | Mapping[str, Any], /, **options: Any) -> dramatiq.Message[Any]:  # type: ignore[override,unused-ignore]
        """Validate ``params`` and enqueue it for background processing (fire-and-forget).

        ``options`` are Dramatiq message options (``delay`` in ms, ``max_retries``, ...).
        While the broker is unreachable the enqueue is retried for up to the config's
        ``send_retry_seconds`` (5 s by default). Raises ``pydantic.ValidationError`` (nothing is
        enqueued) or ``RPCConnectionError`` (still unreachable after that).
        """
        return self.send_with_options(args=(params,), **options)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        """Dramatiq's ``send_with_options``, validated; broker errors become ``RPCConnectionError``."""
        message = self.message_with_options(args=args, kwargs=kwargs, **options)
        return self._enqueue(message, delay, retry_for=self._send_retry_seconds())

    def _send_retry_seconds(self) -> float:
        try:
            return self._replies().config.send_retry_seconds
        except RPCConfigurationError:
            return 0.0

    def _enqueue(
        self, message: dramatiq.Message[Any], delay: timedelta | int | None, *, retry_for: float = 0.0
    ) -> dramatiq.Message[Any]:
        self._replies()  # no rpc-tasks middleware: a clear error instead of a message nobody answers
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        return enqueue_retrying(self.broker, message, delay, retry_for)

    def call(
        self,
        params: TParams | Mapping[str, Any],
        /,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> TResult:
        """Enqueue ``params`` and block until the worker's typed result arrives.

        ``timeout`` is in seconds (float, millisecond precision; default: the config's
        ``rpc_timeout``). Raises ``ValidationError`` for bad params (nothing enqueued),
        :class:`RPCTimeoutError` when no reply arrives in time, :class:`RPCRemoteError` with
        the structured error when the actor failed for good, :class:`RPCConnectionError` when
        Redis/the broker is unreachable.
        """
        return cast(TResult, _calls.call(self, params, timeout, options))

    @overload
    def call_many(
        self,
        params_list: Sequence[TParams | Mapping[str, Any]],
        /,
        *,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
        **options: Any,
    ) -> list[TResult]: ...

    @overload
    def call_many(
        self,
        params_list: Sequence[TParams | Mapping[str, Any]],
        /,
        *,
        timeout: float | None = None,
        return_exceptions: Literal[True],
        **options: Any,
    ) -> list[TResult | RPCException]: ...

    def call_many(
        self,
        params_list: Sequence[TParams | Mapping[str, Any]],
        /,
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        **options: Any,
    ) -> list[TResult] | list[TResult | RPCException]:
        """Run many calls at once from this thread and collect the typed results in order.

        Every params object is validated before anything is enqueued. All replies come back on
        one reply list, drained in batches (``BLPOP`` + ``LPOP count``), so hundreds of calls
        in flight cost about one round trip per batch of replies. ``timeout`` applies to the
        whole batch. With ``return_exceptions=True`` a failed call's ``RPCRemoteError`` /
        ``RPCTimeoutError`` takes its place in the list; otherwise the first one (in order) is
        raised after all replies were collected. When the reply connection drops, the replies
        already drained are kept and the rest are waited for on a new connection (they are
        still in Redis); calls still unanswered at the deadline because Redis stayed
        unreachable get an ``RPCConnectionError``.
        """
        return _calls.call_many(self, params_list, timeout, return_exceptions, options)

    # -- execution -----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function. In a worker, params come as JSON and the result goes to the reply
        middleware; called directly, it takes a params model and returns the result model."""
        ctx = context.current()
        in_worker = ctx is not None and ctx.actor_name == self.actor_name
        if not in_worker:
            if kwargs or len(args) != 1:
                raise TypeError(f"{self.actor_name}() takes exactly one params argument")
            if self.is_async:  # ``await actor(params)``, as calling the ``async def`` would be
                return _aio_calls.run_directly(self, args[0])
            result = self._coerce_result(self.fn(self.validate_params(args[0])))
            return result
        assert ctx is not None
        if ctx.message is not None:
            attempt = ctx.message.options.get(protocol.OPTION_ATTEMPT, 0)
            ctx.message.options[protocol.OPTION_ATTEMPT] = (attempt if isinstance(attempt, int) else 0) + 1
        if kwargs or len(args) != 1:
            raise RPCRemoteError(
                RPCError(
                    code=RPCErrorCode.INVALID_REQUEST,
                    message=f"message for {self.actor_name!r} must carry exactly one params argument",
                )
            )
        try:
            params = self.validate_params(args[0])
        except ValidationError as exc:
            raise RPCRemoteError(protocol.error_from_exception(exc)) from exc
        if STORED_RESULT in ctx.extra:  # idempotent and already run: its stored result
            result = self._coerce_result(ctx.extra.pop(STORED_RESULT))
        else:
            result = self._coerce_result(self.fn(params))
        ctx.result = result
        ctx.has_result = True
        # Dramatiq warns about return values unless Results (or a pipeline) wants them.
        if ctx.extra.get("pipe_target") or self._has_results_middleware():
            return protocol.model_to_wire(result)
        return None

    def _middleware_view(self) -> tuple[RPCReplies | None, bool]:
        """(the broker's RPCReplies or None, whether Results is installed), recomputed only when
        the broker's middleware list changes (this runs for every message)."""
        broker = self.broker
        middleware = tuple(broker.middleware)  # compared by identity, element by element
        cached = self.__dict__.get("_mw_cache")
        if cached is not None and cached[0] is broker and cached[1] == middleware:
            return cast("tuple[RPCReplies | None, bool]", cached[2])
        from dramatiq.results import Results

        try:
            replies: RPCReplies | None = find_replies_middleware(self.broker)
        except RPCConfigurationError:
            replies = None
        view = (replies, any(type(m) is Results for m in middleware))
        self.__dict__["_mw_cache"] = (broker, middleware, view)
        return view

    def _replies(self) -> RPCReplies:
        replies = self._middleware_view()[0]
        if replies is None:
            return find_replies_middleware(self.broker)  # raises the configuration error
        return replies

    def _has_results_middleware(self) -> bool:
        return self._middleware_view()[1]

    # -- async callers: see rpc_tasks.aio --------------------------------------------------------

    @property
    def is_async(self) -> bool:
        """True for an ``async def`` actor (run on Dramatiq's ``AsyncIO`` event loop thread)."""
        return _aio_calls.coroutine_function(self) is not None

    # Plain methods returning the coroutine (``await actor.acall(...)``): one coroutine frame
    # per waiting call instead of two (10,000 waiting calls: ~4 MB less). Observed like their
    # sync twins (same kinds, spans and metrics); only while something observes
    # (``metrics.active``) is the coroutine wrapped in an observing one.

    def acall(
        self, params: TParams | Mapping[str, Any], /, *, timeout: float | None = None, **options: Any
    ) -> Coroutine[Any, Any, TResult]:
        """:meth:`call` for ``asyncio``: same validation, options, deadline, errors and result,
        waiting without blocking the event loop (see :mod:`rpc_tasks.aio.calls`)."""
        coro = _aio_calls.acall(self, params, timeout, options)
        return metrics.observing("call", _labels(self), coro) if metrics.active else coro

    def acall_many(
        self,
        params_list: Sequence[TParams | Mapping[str, Any]],
        /,
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        **options: Any,
    ) -> Coroutine[Any, Any, list[Any]]:
        """:meth:`call_many` for ``asyncio`` (same arguments, results and errors)."""
        coro = _aio_calls.acall_many(self, params_list, timeout, return_exceptions, options)
        return metrics.observing("call_many", _labels(self), coro) if metrics.active else coro

    def asend(
        self, params: TParams | Mapping[str, Any], /, **options: Any
    ) -> Coroutine[Any, Any, dramatiq.Message[Any]]:
        """:meth:`send` for ``asyncio``: validated, enqueued without blocking the loop."""
        coro = _aio_calls.asend(self, params, options)
        return metrics.observing("send", _labels(self), coro) if metrics.active else coro


def _labels(actor: dramatiq.Actor[Any, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Labels of an actor's observed operations (see :func:`rpc_tasks.metrics.observe`)."""
    return {"actor": actor.actor_name, "queue": actor.queue_name}


# .send() (send_with_options), .call() and .call_many() are observed operations: tracing spans,
# in-flight gauges and latency events hook in there (rpc_tasks.metrics.observe; free when off).
# .asend(), .acall() and .acall_many() observe themselves (metrics.observing, above).
RPCActor.send_with_options = metrics.observed("send", _labels)(RPCActor.send_with_options)  # type: ignore[method-assign]
RPCActor.call = metrics.observed("call", _labels)(RPCActor.call)  # type: ignore[method-assign]
RPCActor.call_many = metrics.observed("call_many", _labels)(RPCActor.call_many)  # type: ignore[method-assign]
