"""rpc-tasks in a user's project folder that has a module of its own named ``middleware``
(common in small apps): a ``dramatiq`` worker started there, and a ``.call()`` made from there,
must both work (rpc-tasks never imports the top-level ``middleware`` name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .support import unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TASKS = """
import os

from pydantic import BaseModel

from middleware import Stamp  # the project's own module, not rpc-tasks'
from rpc_tasks import WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.redis.broker import BlockingRedisBroker

URL = os.environ["APP_REDIS_URL"]
setup_broker(
    BlockingRedisBroker(url=URL, namespace=os.environ["APP_NAMESPACE"]),
    config=WebSocketRPCConfig(redis_url=URL, response_key_prefix=os.environ["APP_NAMESPACE"] + ":resp:"),
)


class Greeting(BaseModel):
    name: str


class Reply(BaseModel):
    text: str


@rpc_actor(queue_name=os.environ["APP_QUEUE"])
def greet(params: Greeting) -> Reply:
    return Reply(text=Stamp().stamp(f"hello {params.name}"))
"""

MIDDLEWARE = '''
class Stamp:
    """A project module that happens to be called middleware.py."""

    def stamp(self, text: str) -> str:
        return f"[app] {text}"
'''

CALLER = """
from tasks import Greeting, greet

print(greet.call(Greeting(name="newcomer"), timeout=20).text)
"""


def test_worker_and_call_from_a_folder_with_its_own_middleware_module(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "middleware.py").write_text(textwrap.dedent(MIDDLEWARE))
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS))
    (tmp_path / "caller.py").write_text(textwrap.dedent(CALLER))
    env = {
        **os.environ,
        "APP_REDIS_URL": redis_url,
        "APP_NAMESPACE": unique("userproj"),
        "APP_QUEUE": unique("q"),
        "PYTHONPATH": "",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "tasks", "--processes", "1", "--threads", "1"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        caller = subprocess.run(
            [sys.executable, "caller.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert caller.returncode == 0, caller.stderr
        assert caller.stdout.strip() == "[app] hello newcomer"
        assert worker.poll() is None, "the worker exited"
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            _, err = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            _, err = worker.communicate()
    assert b"ModuleNotFoundError" not in err and b"Traceback" not in err, err.decode(errors="replace")[-2000:]
