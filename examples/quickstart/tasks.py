"""Quick-start actors. Run a worker with the ordinary Dramatiq CLI::

    dramatiq examples.quickstart.tasks

The broker comes from ``$DRAMATIQ_BROKER_URL`` (Redis or RabbitMQ), else the reply Redis
(``$WEBSOCKET_RPC_REDIS_URL`` or ``$REDIS_URL``, default ``redis://localhost:6379/2``).
"""

from __future__ import annotations

import os
import time

import redis
from pydantic import BaseModel, Field

from rpc_tasks import RPCRemoteError, UserNotConnectedError, rpc_actor, setup_broker

broker = setup_broker()

#: Where ``record`` appends what it received (so the demo can show ``.send()`` worked).
RECORD_KEY = "quickstart:records"


class EchoParams(BaseModel):
    message: str = Field(max_length=1000)


class EchoResult(BaseModel):
    message: str


@rpc_actor(queue_name="rpc", max_retries=3)
def echo(params: EchoParams) -> EchoResult:
    """Return the message unchanged."""
    return EchoResult(message=params.message)


class NotifyParams(BaseModel):
    user_id: str
    text: str


class NotifyResult(BaseModel):
    delivered: bool


ONLINE_USERS = {"alice", "bob"}


@rpc_actor(queue_name="rpc", max_retries=3)
def notify(params: NotifyParams) -> NotifyResult:
    """Pretend to notify a user; offline users give a typed, non-retryable error."""
    if params.user_id not in ONLINE_USERS:
        raise RPCRemoteError(
            UserNotConnectedError(
                message=f"user {params.user_id!r} is not connected",
                user_id=params.user_id,
                retry_after=30,
            )
        )
    return NotifyResult(delivered=True)


class SleepParams(BaseModel):
    seconds: float = Field(ge=0, le=30)


class SleepResult(BaseModel):
    slept: float


@rpc_actor(queue_name="rpc", max_retries=0)
def sleepy(params: SleepParams) -> SleepResult:
    """Sleep, to show caller timeouts."""
    time.sleep(params.seconds)
    return SleepResult(slept=params.seconds)


class RecordParams(BaseModel):
    text: str


@rpc_actor(queue_name="rpc", max_retries=3)
def record(params: RecordParams) -> None:
    """Background job: append ``text`` to a Redis list."""
    url = (
        os.environ.get("WEBSOCKET_RPC_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://localhost:6379/2"
    )
    client = redis.Redis.from_url(url)
    try:
        client.rpush(RECORD_KEY, params.text)
        client.expire(RECORD_KEY, 600)
    finally:
        client.close()
