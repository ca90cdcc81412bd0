"""The methods every :class:`~rpc_tasks.streams.server.RPCServer` answers: ``ping`` (what
``health_check()`` calls) and ``echo``."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

#: Built-in method every server answers (used by ``WebSocketRPCClient.health_check``).
PING_METHOD = "ping"


class PingParams(BaseModel):
    """Params of the built-in ``ping`` method."""

    nonce: str | None = Field(default=None, max_length=128)


class PingResult(BaseModel):
    """Result of ``ping``: proves a server consumed the request."""

    pong: bool = True
    server: str = ""
    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    nonce: str | None = None


class EchoParams(BaseModel):
    """Params of the built-in ``echo`` method."""

    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class EchoResult(EchoParams):
    """``echo`` returns its params."""


def echo(params: EchoParams) -> EchoResult:
    """The built-in ``echo``: returns its params."""
    return EchoResult(message=params.message, data=params.data)
