"""Runs the Python snippets of README.md and docs/*.md as written (collected by sybil, see
``conftest.py``), with the Redis, worker or server each document needs.

What a document can contain:

* a ```` ```python ```` block: executed in the document's namespace (blocks of one document
  share it, in order), in the document's own project folder (the current directory, on
  ``sys.path``) with ``REDIS_URL`` pointing at the test Redis DB;
* a ```` ```python title="tasks.py" ```` block: written to that file in the project folder, as a
  reader would save it (MkDocs shows the title);
* HTML comments, invisible on the page, that start what a reader would start in a terminal:

  - ``<!-- docs: worker tasks -->``: ``dramatiq tasks`` in the project folder (waits until it is
    ready; stopped after the document);
  - ``<!-- docs: run caller.py -->``: ``python caller.py`` there; it must exit 0;
  - ``<!-- docs: start scheduler.py -->``: ``python scheduler.py`` in the background;
  - ``<!-- docs: serve myrpc:server -->``: ``rpc-tasks serve --app myrpc:server``;
  - ``<!-- docs: ws -->``: ``rpc-tasks ws`` (secret ``WEBSOCKET_RPC_WEBSOCKET_SECRET`` set);
  - ``<!-- docs: env NAME=value -->``: an environment variable for the rest of the document;
  - ``<!-- skip: next -->`` (sybil's own): the next block is not run (say why next to it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dramatiq

ROOT = Path(__file__).resolve().parents[2]
#: Test Redis DB for documents (never DB 0); the suite's own default is DB 9.
REDIS_URL = os.environ.get("RPC_TEST_DOCS_REDIS_URL") or os.environ.get(
    "RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"
)
SECRET = "docs-test-secret-0123456789"


class DocumentRun:
    """One document's project folder, environment and background processes."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="rpc-tasks-docs-"))
        self.env = {
            **os.environ,
            "REDIS_URL": REDIS_URL,
            "DRAMATIQ_BROKER_URL": REDIS_URL,
            "WEBSOCKET_RPC_WEBSOCKET_SECRET": SECRET,
            "PYTHONPATH": str(self.folder),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self._saved_env = dict(os.environ)
        self._saved_cwd = os.getcwd()
        self._saved_path = list(sys.path)
        self._saved_modules = set(sys.modules)
        self._saved_broker = dramatiq.get_broker() if _has_global_broker() else None

    def enter(self) -> None:
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        _forget_rpc_client()  # get_rpc_client() builds from the environment set here
        os.environ.update({k: v for k, v in self.env.items() if k != "PYTHONPATH"})
        os.chdir(self.folder)
        sys.path.insert(0, str(self.folder))

    def leave(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        os.chdir(self._saved_cwd)
        sys.path[:] = self._saved_path
        os.environ.clear()
        os.environ.update(self._saved_env)
        for name in set(sys.modules) - self._saved_modules:
            module = sys.modules.get(name)
            if str(getattr(module, "__file__", "") or "").startswith(str(self.folder)):
                del sys.modules[name]
        if self._saved_broker is not None:
            dramatiq.set_broker(self._saved_broker)
        _forget_rpc_client()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- directives ---------------------------------------------------------------------------

    def directive(self, text: str) -> None:
        verb, _, rest = text.strip().partition(" ")
        args = shlex.split(rest)
        if verb == "worker":
            self.background(
                [sys.executable, "-m", "dramatiq", *args, "--processes", "1", "--threads", "2"],
                ready=b"Worker process is ready for action",
            )
        elif verb == "serve":
            command = [sys.executable, "-m", "rpc_tasks.cli", "serve", "--app", *args]
            self.background(command, ready=b"consuming")
        elif verb == "ws":
            self.background([sys.executable, "-m", "rpc_tasks.cli", "ws", *args], ready=b"WebSocket server")
        elif verb == "start":
            self.background([sys.executable, *args], ready=b"")
        elif verb == "run":
            result = subprocess.run(
                [sys.executable, *args], cwd=self.folder, env=self.env, capture_output=True, timeout=120
            )
            output = f"{result.stdout.decode()}\n{result.stderr.decode()}"
            assert result.returncode == 0, f"python {rest} exited {result.returncode}:\n{output}"
        elif verb == "env":
            name, _, value = rest.partition("=")
            self.env[name.strip()] = value.strip()
            os.environ[name.strip()] = value.strip()
        else:
            raise AssertionError(f"unknown docs directive {text!r}")

    def background(self, command: list[str], ready: bytes) -> None:
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            command,
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log.seek(0)
            output = log.read()
            if ready in output:
                return
            if proc.poll() is not None:
                raise AssertionError(f"{shlex.join(command)} exited {proc.returncode}:\n{output.decode()}")
            time.sleep(0.05)
        raise AssertionError(f"{shlex.join(command)} was not ready within 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _forget_rpc_client() -> None:
    from rpc_tasks.streams import client

    with client._client_lock:
        if client._client is not None:
            client._client.close()
        client._client = None


def _has_global_broker() -> bool:
    from dramatiq import broker as broker_module

    return getattr(broker_module, "global_broker", None) is not None


def write_file(example: Any) -> None:
    """Evaluator of a titled block: save it in the document's project folder."""
    run: DocumentRun = example.namespace["__docs_run__"]
    name = example.region.lexemes["arguments"].split('title="', 1)[1].split('"', 1)[0]
    (run.folder / name).write_text(str(example.parsed), encoding="utf-8")


def run_directive(example: Any) -> None:
    """Evaluator of a ``<!-- docs: ... -->`` comment."""
    run: DocumentRun = example.namespace["__docs_run__"]
    run.directive(str(example.parsed))
