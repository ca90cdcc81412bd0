"""``@rpc_actor``: declares an :class:`~rpc_tasks.actor.RPCActor` (sync or ``async def``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast, overload

import dramatiq
from pydantic import BaseModel

from .actor import RPCActor
from .broker_setup import install_asyncio
from .middleware.ratelimits import parse_rate
from .signatures import MISSING, infer_models

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound="BaseModel | None")


class RPCActorDecorator(Protocol):
    """What ``@rpc_actor(...)`` with options returns: takes a plain or an ``async def``
    function of one params model."""

    @overload
    def __call__(self, fn: Callable[[P], Awaitable[R]], /) -> RPCActor[P, R]: ...

    @overload
    def __call__(self, fn: Callable[[P], R], /) -> RPCActor[P, R]: ...


@overload
def rpc_actor(fn: Callable[[P], Awaitable[R]], /) -> RPCActor[P, R]: ...


@overload
def rpc_actor(fn: Callable[[P], R], /) -> RPCActor[P, R]: ...


@overload
def rpc_actor(
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: dramatiq.Broker | None = None,
    params_model: type[BaseModel] | None = None,
    result_model: type[BaseModel] | None = ...,
    **options: Any,
) -> RPCActorDecorator: ...


def rpc_actor(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: dramatiq.Broker | None = None,
    params_model: type[BaseModel] | None = None,
    result_model: Any = MISSING,
    **options: Any,
) -> Any:
    """Declare a typed RPC actor.

    ::

        @rpc_actor(queue_name="rpc", max_retries=3)
        def echo(params: EchoParams) -> EchoResult:
            return EchoResult(message=params.message)

        echo.send(EchoParams(message="hi"))                        # background
        result = echo.call(EchoParams(message="hi"), timeout=2.5)  # -> EchoResult

    The params model is taken from the first parameter's annotation and the result model from
    the return annotation (``None`` means "no result"), unless given explicitly. ``options``
    are Dramatiq actor options (``max_retries``, ``time_limit``, ``min_backoff``, ...). The
    actor is declared on ``broker`` or on Dramatiq's global broker at decoration time, so set
    the broker up first (:func:`rpc_tasks.setup_broker`).

    An ``async def`` function makes an async actor: workers run it on the event loop thread
    of Dramatiq's ``AsyncIO`` middleware (added to the broker here if it lacks it), with the
    same validation, retries, rate limits, deadlines and replies; ``await actor(params)`` runs
    it in-process.
    """

    def decorator(fn: Callable[..., Any]) -> RPCActor[Any, Any]:
        pm, rm = infer_models(fn, params_model, result_model)
        if options.get("rate_limit") is not None:
            parse_rate(options["rate_limit"])  # a clear error now, not on the first message
        actor_class = functools.partial(RPCActor, params_model=pm, result_model=rm)
        actor = dramatiq.actor(  # type: ignore[call-overload]
            fn,
            actor_class=actor_class,
            actor_name=actor_name,
            queue_name=queue_name,
            priority=priority,
            broker=broker,
            **options,
        )
        functools.update_wrapper(actor, fn, updated=())
        if inspect.iscoroutinefunction(fn):  # run by Dramatiq's AsyncIO middleware
            install_asyncio(actor.broker)
        return cast(RPCActor[Any, Any], actor)

    if fn is not None:
        return decorator(fn)
    return decorator
