"""The fault suite's worker side (``benchmarks.chaos``): two ``@rpc_actor`` jobs (one plain, one
``idempotent=True``) and a Streams ``RPCServer`` with one method. Each counts its *completed*
runs in a Redis hash per kind (``<tag>:exec:<kind>``, field = job id), so the suite can tell
"ran once", "ran twice" and "never ran".

    dramatiq benchmarks.workers.chaos_app --processes 1 --threads 4
    python -m rpc_tasks.cli serve --app benchmarks.workers.chaos_app:make_server

Redis and key names come from ``CHAOS_REDIS_URL`` and ``CHAOS_TAG``.
"""

from __future__ import annotations

import os
import threading
import time

import redis
from pydantic import BaseModel

from rpc_tasks import RPCServer, WebSocketRPCConfig, rpc_actor, setup_broker

URL = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6399/0")
TAG = os.environ.get("CHAOS_TAG", "chaos")
QUEUE = f"{TAG}_q"


def config() -> WebSocketRPCConfig:
    """Settings shared by the workers, the servers and the suite's callers."""
    return WebSocketRPCConfig(
        redis_url=URL,
        response_key_prefix=f"{TAG}:resp:",
        request_stream=f"{TAG}:requests",
        consumer_group=f"{TAG}:group",
        rpc_timeout=30,
    )


class Job(BaseModel):
    id: str
    work_ms: int = 20


class Done(BaseModel):
    id: str


_local = threading.local()


def exec_key(kind: str) -> str:
    return f"{TAG}:exec:{kind}"


def _completed(kind: str, params: Job) -> Done:
    time.sleep(params.work_ms / 1000.0)
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = redis.Redis.from_url(URL)
    give_up = time.monotonic() + 60
    while True:  # the count must survive a Redis restart, or the suite would call the run lost
        try:
            client.hincrby(exec_key(kind), params.id, 1)
            break
        except redis.RedisError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)
    return Done(id=params.id)


broker = setup_broker(config=config(), broker_url=URL)


@rpc_actor(queue_name=QUEUE, max_retries=3, min_backoff=100, max_backoff=1000)
def chaos_plain(params: Job) -> Done:
    return _completed("plain", params)


@rpc_actor(queue_name=QUEUE, idempotent=True, max_retries=3, min_backoff=100, max_backoff=1000)
def chaos_idem(params: Job) -> Done:
    return _completed("idem", params)


def make_server() -> RPCServer:
    server = RPCServer(config(), claim_idle=6.0, claim_interval=2.0, concurrency=4)
    server.register(
        "chaos_echo", lambda params: _completed("streams", params), params_model=Job, result_model=Done
    )
    return server
