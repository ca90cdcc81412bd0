"""Start everything the example project needs with one command; Ctrl-C stops it all.

    make django-demo      (or: .venv/bin/python examples/django_project/run.py)

1. finds Redis (``$REDIS_URL``, else 127.0.0.1:6379, else a local redis-server / fakeredis);
2. ``manage.py migrate``;
3. starts a Dramatiq worker (``manage.py rundramatiq``), the WebSocket server
   (``rpc-tasks ws``), the bridge consumer (``manage.py rpc_serve --bridge``) and Django's
   development server on http://127.0.0.1:8000/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from examples.quickstart.local_redis import local_redis  # noqa: E402


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop the children on SIGTERM too, not only Ctrl-C
    port = int(os.environ.get("PORT", "8000"))
    ws_port = int(os.environ.get("WS_PORT", "8765"))
    with local_redis() as url:
        env = {
            **os.environ,
            "REDIS_URL": url,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "WS_URL": f"ws://127.0.0.1:{ws_port}",
            "PYTHONUNBUFFERED": "1",
        }
        # the WebSocket server reads the same settings from the environment
        env.update(
            {
                "WEBSOCKET_RPC_REDIS_URL": url,
                "WEBSOCKET_RPC_WEBSOCKET_SECRET": os.environ.get(
                    "WEBSOCKET_SECRET", "dev-only-websocket-secret-change-me"
                ),
                "WEBSOCKET_RPC_ENABLE_BRIDGE": "true",
            }
        )
        manage = [sys.executable, str(HERE / "manage.py")]
        subprocess.run([*manage, "migrate", "--verbosity", "0"], env=env, check=True, cwd=HERE)
        commands = {
            "worker": [
                *manage,
                "rundramatiq",
                "--processes",
                "1",
                "--threads",
                "4",
                "--worker-shutdown-timeout",
                "5000",
            ],
            "websocket": [
                sys.executable,
                "-m",
                "rpc_tasks.cli",
                "ws",
                "--host",
                "127.0.0.1",
                "--port",
                str(ws_port),
            ],
            "bridge": [*manage, "rpc_serve", "--bridge"],
            "django": [*manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
        }
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, cmd in commands.items():
                procs[name] = subprocess.Popen(cmd, env=env, cwd=HERE, start_new_session=True)
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            print(
                f"\n  Open http://127.0.0.1:{port}/page/alice/ and, in another tab, "
                f"http://127.0.0.1:{port}/notify/alice/\n  Ctrl-C stops everything.\n",
                flush=True,
            )
            while all(p.poll() is None for p in procs.values()):
                time.sleep(0.5)
            dead = [n for n, p in procs.items() if p.poll() is not None]
            print(f"[run] {', '.join(dead)} exited; stopping the rest", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\n[run] stopping...", flush=True)
            return 0
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            for proc in procs.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())
