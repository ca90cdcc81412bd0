"""What a newcomer sees from the ``rpc-tasks`` command: one-line errors that name the fix (exit 2,
no traceback unless ``--debug``), ``--version``, plain ``--help``, and ``serve`` importing from
the current folder as ``dramatiq`` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

import rpc_tasks

from .support import free_port, unique, wait_until

pytestmark = [pytest.mark.redis]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpc_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_version_and_plain_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"rpc-tasks {rpc_tasks.__version__}"
    help_text = run_cli("--help").stdout
    assert "rpc-tasks serve --app" in help_text and "``" not in help_text and ":class:" not in help_text
    for command in ("serve", "health", "ws"):
        sub = run_cli(command, "--help").stdout
        assert "--" in sub and "SUPPRESS" not in sub


def test_bad_redis_url_is_one_line_naming_the_variable_and_exit_2() -> None:
    result = run_cli("health", env={"WEBSOCKET_RPC_REDIS_URL": "redis//localhost", "REDIS_URL": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "WEBSOCKET_RPC_REDIS_URL='redis//localhost'" in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = run_cli("--debug", "health", env={"WEBSOCKET_RPC_REDIS_URL": "redis//localhost"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("secret", [None, ""])
def test_ws_without_a_secret_is_one_line(
    redis_url: str, secret: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEBSOCKET_RPC_WEBSOCKET_SECRET", raising=False)
    env = {"REDIS_URL": redis_url, **({} if secret is None else {"WEBSOCKET_RPC_WEBSOCKET_SECRET": secret})}
    result = run_cli("ws", "--port", "0", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "WEBSOCKET_RPC_WEBSOCKET_SECRET" in result.stderr


def test_health_says_redis_is_unreachable_rather_than_no_server() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("health", "--timeout", "1", env={"REDIS_URL": url})
    assert result.returncode == 1
    assert "Redis is not reachable" in result.stdout and "no server answered" not in result.stdout


def test_health_with_redis_up_and_no_server(redis_url: str) -> None:
    env = {"REDIS_URL": redis_url, "WEBSOCKET_RPC_REQUEST_STREAM": unique("stream")}
    result = run_cli("health", "--timeout", "0.5", env=env)
    assert result.returncode == 1 and "no server answered ping" in result.stdout


def test_serve_imports_from_the_current_folder_and_stops_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    stream = unique("stream")
    (tmp_path / "myrpc.py").write_text(
        textwrap.dedent(
            """
            from rpc_tasks import RPCServer

            server = RPCServer(concurrency=2)
            """
        )
    )
    env = {**os.environ, "REDIS_URL": redis_url, "WEBSOCKET_RPC_REQUEST_STREAM": stream, "PYTHONPATH": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpc_tasks.cli", "serve", "--app", "myrpc:server"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        health_env = {"REDIS_URL": redis_url, "WEBSOCKET_RPC_REQUEST_STREAM": stream}
        wait_until(lambda: run_cli("health", "--timeout", "1", env=health_env).returncode == 0, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert time.monotonic() - started < 25
    assert redis.Redis.from_url(redis_url).exists(stream)


def test_serve_with_a_module_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--app", "nothere:server", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot import 'nothere'" in result.stderr
