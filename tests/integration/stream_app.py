"""An RPCServer for subprocess tests: ``rpc-tasks serve --app tests.integration.stream_app:server``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from pydantic import BaseModel

from rpc_tasks import RPCServer, WebSocketRPCConfig

URL = os.environ.get("RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
STREAM = os.environ.get("STREAM_APP_STREAM", "stream_app:requests")
PREFIX = os.environ.get("STREAM_APP_PREFIX", "stream_app:resp:")
LOG_KEY = "stream_app:log"

config = WebSocketRPCConfig(redis_url=URL, request_stream=STREAM, response_key_prefix=PREFIX)
server = RPCServer(
    config, concurrency=4, claim_idle=float(os.environ.get("STREAM_APP_CLAIM_IDLE", "30")), claim_interval=0.5
)


class Work(BaseModel):
    job: str
    seconds: float = 0


class Done(BaseModel):
    job: str
    server: str


@server.method("work")
def work(params: Work) -> Done:
    client = redis.Redis.from_url(URL)
    try:
        client.rpush(LOG_KEY, f"start:{params.job}:{server.consumer_name}")
        time.sleep(params.seconds)
        client.rpush(LOG_KEY, f"done:{params.job}:{server.consumer_name}")
    finally:
        client.close()
    return Done(job=params.job, server=server.consumer_name)


def serve(redis_url: str, stream: str, prefix: str) -> tuple[subprocess.Popen[bytes], WebSocketRPCConfig]:
    """This app under ``rpc-tasks serve`` (its own process group, output discarded) on
    ``redis_url``, ``stream`` and reply ``prefix``; and the settings its callers use."""
    env = {
        **os.environ,
        "RPC_TEST_REDIS_URL": redis_url,
        "STREAM_APP_STREAM": stream,
        "STREAM_APP_PREFIX": prefix,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpc_tasks.cli", "serve", "--app", "tests.integration.stream_app:server"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, config.model_copy(update={"request_stream": stream, "response_key_prefix": prefix})
