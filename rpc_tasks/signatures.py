"""Params and result models read from a handler's signature, for ``@rpc_actor`` and
``RPCServer.register`` alike: one parameter annotated with a Pydantic model, and a return
annotation that is a model or ``None``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

#: "Not given" marker for ``result_model=`` (``None`` means "no result").
MISSING: Any = object()


def infer_models(
    fn: Callable[..., Any], params_model: Any, result_model: Any
) -> tuple[type[BaseModel], type[BaseModel] | None]:
    """``(params_model, result_model)`` of ``fn``: the explicit ones where given (``result_model``
    :data:`MISSING` = read it from the return annotation), else from its annotations. Raises
    ``TypeError`` naming what to fix."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        if params_model is None or result_model is MISSING:
            raise TypeError(
                f"@rpc_actor could not resolve the annotations of {name}: {exc}. "
                "Pass params_model= and result_model= explicitly."
            ) from exc
        hints = {}
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) != 1 or any(
        p.default is p.empty and p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in inspect.signature(fn).parameters.values()
    ):
        raise TypeError(f"@rpc_actor function {name} must take exactly one parameter (the params model)")
    if params_model is None:
        params_model = hints.get(params[0].name)
    if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
        raise TypeError(
            f"@rpc_actor: the parameter {params[0].name!r} of {name} must be annotated with a "
            f"pydantic BaseModel subclass (got {params_model!r}); or pass params_model=."
        )
    if result_model is MISSING:
        if "return" not in hints:
            raise TypeError(
                f"@rpc_actor: {name} needs a return annotation (a pydantic BaseModel subclass, "
                "or None); or pass result_model=."
            )
        result_model = hints["return"]
    if result_model is type(None):
        result_model = None
    if result_model is not None and not (
        isinstance(result_model, type) and issubclass(result_model, BaseModel)
    ):
        raise TypeError(
            f"@rpc_actor: the return annotation of {name} must be a pydantic BaseModel subclass "
            f"or None (got {result_model!r}); or pass result_model=."
        )
    return params_model, result_model
