"""The methods every :class:`~rpc_tasks.streams.server.RPCServer` answers: ``ping`` (what
``health_check()`` calls), ``system.ping`` (django-ipc's name, answered in its shape) and
``echo`` (whose result both our client and django-cfg's original client parse)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Built-in method every server answers (used by ``WebSocketRPCClient.health_check``).
PING_METHOD = "ping"
#: django-ipc's ping; our servers answer it too, and ``health_check`` falls back to it.
SYSTEM_PING_METHOD = "system.ping"


class PingParams(BaseModel):
    """Params of the built-in ``ping`` method."""

    nonce: str | None = Field(default=None, max_length=128)


class PingResult(BaseModel):
    """Result of ``ping``: proves a server consumed the request."""

    pong: bool = True
    server: str = ""
    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    nonce: str | None = None


class SystemPingParams(BaseModel):
    """Params of ``system.ping`` (django-ipc's): a message to send back and a delay to wait."""

    message: str = Field(default="ping", max_length=1000)
    delay_ms: int = Field(default=0, ge=0, le=5000)


class SystemPingResult(BaseModel):
    """Result of ``system.ping``: ``pong`` is the message (django-ipc's shape)."""

    pong: str
    timestamp: float
    delay_ms: int = 0
    server_time: str


def system_ping(params: SystemPingParams) -> SystemPingResult:
    """The built-in ``system.ping``: waits ``delay_ms``, then answers with the message."""
    if params.delay_ms:
        time.sleep(params.delay_ms / 1000)
    now = datetime.now(timezone.utc)
    return SystemPingResult(
        pong=params.message,
        timestamp=now.timestamp(),
        delay_ms=params.delay_ms,
        server_time=now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
    )


class EchoParams(BaseModel):
    """Params of the built-in ``echo`` method."""

    model_config = ConfigDict(extra="ignore")

    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _null_data(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("data", {}) is None:
            value = {**value, "data": {}}
        return value


class EchoResult(EchoParams):
    """``echo`` returns its params, plus ``echoed`` (the message) and ``length`` (its length in
    characters), which is the result django-cfg's original client expects."""

    echoed: str = ""
    length: int = Field(default=0, ge=0)


def echo(params: EchoParams) -> EchoResult:
    """The built-in ``echo``: returns its params."""
    return EchoResult(
        message=params.message, data=params.data, echoed=params.message, length=len(params.message)
    )
