"""``rpc-tasks ws`` server processes and WebSocket frame helpers shared by the WebSocket
server tests (tests/integration/test_wsserver*.py, the Django project's tests) and the wait
for a server's HTTP health endpoint (also used by the django-ipc interop tests)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from rpc_tasks import WebSocketRPCConfig
from rpc_tasks.websocket.auth import make_token

from .support import free_port, unique

ROOT = Path(__file__).resolve().parents[2]


def ws_config(redis_url: str, secret: str, **kwargs: Any) -> WebSocketRPCConfig:
    """Settings of a test's ws server: its own streams, keys and channels, the bridge on."""
    return WebSocketRPCConfig(
        redis_url=redis_url,
        websocket_secret=secret,
        request_stream=unique("ws:req"),
        response_key_prefix=unique("ws:resp") + ":",
        broadcast_channel=unique("ws:bcast"),
        enable_bridge=True,
        bridge_stream=unique("ws:bridge"),
        bridge_consumer_name=unique("bridge"),
        **kwargs,
    )


def ws_env(config: WebSocketRPCConfig) -> dict[str, str]:
    """This process's environment plus ``config`` as ``WEBSOCKET_RPC_*`` variables."""
    env = dict(os.environ)
    for key, value in config.model_dump(mode="json").items():
        env[f"WEBSOCKET_RPC_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, interval: float = 0.1) -> None:
    """Poll ``url`` until it answers 200; RuntimeError when ``proc`` exits or 30 s pass."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(interval)


class WSServer:
    """``rpc-tasks ws`` on a free port in its own process group, started when ``/healthz``
    answers. Settings come from ``config`` (as environment variables) or a ready ``env``."""

    def __init__(
        self,
        config: WebSocketRPCConfig | None,
        *extra: str,
        log_level: str = "WARNING",
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        stderr: IO[Any] | int | None = None,
    ) -> None:
        if env is None:
            assert config is not None, "a config or an env"
            env = ws_env(config)
        self.port = free_port()
        command = [sys.executable, "-m", "rpc_tasks.cli", "--log-level", log_level, "ws"]
        self.proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port), *extra],
            cwd=cwd,
            env=env,
            start_new_session=True,
            stderr=stderr,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{self.port}/healthz", self.proc, "WebSocket server")
        except RuntimeError:
            self.stop()
            raise

    def socket_url(self, user: str, secret: str) -> str:
        """The ``/ws`` URL with a token for ``user`` signed with ``secret``."""
        return f"ws://127.0.0.1:{self.port}/ws?token={make_token(user, secret)}"

    def kill(self) -> None:
        """SIGKILL the process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


async def recv_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, parsed."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def welcome(ws: Any) -> dict[str, Any]:
    """The first frame, which must be the welcome."""
    frame = await recv_json(ws)
    assert frame["type"] == "welcome"
    return frame
