"""Actors for the subprocess tests, run with ``dramatiq tests.integration.cli_app``.

Settings come from the environment so the test process and the worker processes agree.
"""

from __future__ import annotations

import os
import time

import redis
from pydantic import BaseModel

from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

URL = os.environ.get("RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
QUEUE = "rpc_tasks_cli_test"
LOG_KEY = "cli_app:log"

config = WebSocketRPCConfig(redis_url=URL, response_key_prefix="cli_app:resp:")
broker = setup_broker(
    BlockingRedisBroker(
        url=URL,
        namespace="cli_app",
        heartbeat_timeout=int(os.environ.get("CLI_APP_HEARTBEAT_MS", "60000")),
        maintenance_chance=int(os.environ.get("CLI_APP_MAINTENANCE_CHANCE", "1000")),
    ),
    config=config,
)


class AddParams(BaseModel):
    a: int
    b: int


class AddResult(BaseModel):
    total: int
    pid: int


@rpc_actor(queue_name=QUEUE)
def add(params: AddParams) -> AddResult:
    return AddResult(total=params.a + params.b, pid=os.getpid())


class JobParams(BaseModel):
    job_id: str
    seconds: float


class JobResult(BaseModel):
    job_id: str
    pid: int


def _log(text: str) -> None:
    client = redis.Redis.from_url(URL)
    try:
        client.rpush(LOG_KEY, text)
    finally:
        client.close()


@rpc_actor(queue_name=QUEUE, max_retries=3)
def job(params: JobParams) -> JobResult:
    _log(f"start:{params.job_id}:{os.getpid()}")
    time.sleep(params.seconds)
    _log(f"done:{params.job_id}:{os.getpid()}")
    return JobResult(job_id=params.job_id, pid=os.getpid())


# -- for the retry / rate-limit tests --------------------------------------------------------

from rpc_tasks import RateLimitError, RPCRemoteError, current_message  # noqa: E402

from .fake_remote import FakeRemote  # noqa: E402

RESULTS_KEY = "cli_app:results"
STAMPS_KEY = "cli_app:stamps"
#: The remote's block and the fleet's rate-limit key: a test sets them for its workers. The key
#: is per run because cooldowns are announced on a Pub/Sub channel that every Redis DB shares.
REMOTE_BLOCK_MS = int(os.environ.get("CLI_APP_REMOTE_BLOCK_MS", "1000"))
REMOTE_RATE_KEY = os.environ.get("CLI_APP_REMOTE_RATE_KEY", "fake-remote")
remote = FakeRemote(URL, name="cli_app:remote", budget=5, block_ms=REMOTE_BLOCK_MS)


class RemoteParams(BaseModel):
    n: int


@rpc_actor(
    queue_name=QUEUE, max_retries=10, min_backoff=100, max_backoff=2000, rate_limit_key=REMOTE_RATE_KEY
)
def remote_job(params: RemoteParams) -> None:
    """Call the fake remote; a rate-limit answer becomes a RateLimitError with retry_after."""
    message = current_message()
    ok, retry_after = remote.call(message.message_id)
    if not ok:
        raise RPCRemoteError(RateLimitError(message="remote says slow down", retry_after=retry_after))
    client = redis.Redis.from_url(URL)
    try:
        client.hset(
            RESULTS_KEY,
            message.message_id,
            f"{message.options.get('retries', 0)}:{message.options.get('rpc_postponed_ms', 0)}:{os.getpid()}",
        )
    finally:
        client.close()


@rpc_actor(queue_name=QUEUE, rate_limit="20/s", rate_limit_key="proactive")
def paced(params: RemoteParams) -> None:
    """Record when it ran (the proactive limit must keep the fleet at <= 20 per second)."""
    client = redis.Redis.from_url(URL)
    try:
        client.rpush(STAMPS_KEY, f"{time.time():.6f}:{os.getpid()}")
    finally:
        client.close()
