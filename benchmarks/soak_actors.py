"""Actors for ``benchmarks.soak`` (run by ``dramatiq benchmarks.soak_actors``)."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

URL = os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/13")
config = WebSocketRPCConfig(redis_url=URL, response_key_ttl=5, response_key_prefix="soak:resp:")
broker = setup_broker(BlockingRedisBroker(url=URL, namespace="soak"), config=config)


class Params(BaseModel):
    n: int
    sleep: float = 0


@rpc_actor(queue_name="soak", max_retries=0)
def echo(params: Params) -> Params:
    if params.sleep:
        time.sleep(params.sleep)
    return params
