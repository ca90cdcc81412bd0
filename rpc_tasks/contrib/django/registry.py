"""Handlers served by ``manage.py rpc_serve`` (autodiscovered from each app's ``rpc`` module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ...signatures import MISSING


@dataclass(frozen=True)
class Registered:
    """A handler registered with :func:`rpc_method`."""

    name: str
    fn: Callable[[Any], Any]
    params_model: type[BaseModel] | None
    result_model: Any


#: name -> handler
handlers: dict[str, Registered] = {}


def rpc_method(
    name: str | None = None, *, params_model: type[BaseModel] | None = None, result_model: Any = MISSING
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register ``fn(params) -> result`` for ``manage.py rpc_serve``. Put these in
    ``<app>/rpc.py``; for the WebSocket bridge, the params model is usually
    :class:`rpc_tasks.websocket.models.BridgeParams` (the authenticated user and what the browser sent)."""

    def decorator(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        handlers[name or fn.__name__] = Registered(name or fn.__name__, fn, params_model, result_model)
        return fn

    return decorator
