"""Generic typed request/response envelopes: ``RPCRequest[TParams]`` and ``RPCResponse[TResult]``."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel

from .base import BaseRPCRequest, BaseRPCResponse

TParams = TypeVar("TParams", bound=BaseModel)
TResult = TypeVar("TResult", bound=BaseModel)


class RPCRequest(BaseRPCRequest, Generic[TParams]):
    """A request whose ``params`` is a typed Pydantic model.

    Example::

        RPCRequest[EchoParams](method="echo", params=EchoParams(message="hi"))
    """

    params: TParams


class RPCResponse(BaseRPCResponse, Generic[TResult]):
    """A response whose ``result`` is a typed Pydantic model (``None`` on failure)."""

    result: TResult | None = None
