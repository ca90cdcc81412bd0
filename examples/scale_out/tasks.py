"""Actors of the scale-out example (``examples/scale_out/run.py`` starts two workers on them)::

    dramatiq examples.scale_out.tasks

Messages travel over RabbitMQ (``$DRAMATIQ_BROKER_URL``, ``amqp://...``); replies and the
fleet-wide rate limit live on Redis Cluster (``$WEBSOCKET_RPC_REDIS_URL``,
``redis+cluster://...``). ``$SCALE_OUT_QUEUE`` names the queue (one per run).
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from rpc_tasks import rpc_actor, setup_broker

broker = setup_broker()
QUEUE = os.environ.get("SCALE_OUT_QUEUE", "scale-out")


class AddParams(BaseModel):
    a: int
    b: int


class AddResult(BaseModel):
    total: int
    pid: int


@rpc_actor(queue_name=QUEUE, max_retries=0)
def add(params: AddParams) -> AddResult:
    """Add two numbers; says which worker process did it."""
    return AddResult(total=params.a + params.b, pid=os.getpid())


@rpc_actor(queue_name=QUEUE, rate_limit="20/s", max_retries=0)
def limited_add(params: AddParams) -> AddResult:
    """The same, at most 20 per second across the whole fleet (the limiter is on the cluster)."""
    return AddResult(total=params.a + params.b, pid=os.getpid())
