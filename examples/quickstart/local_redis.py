"""Find a Redis for the demo: ``$REDIS_URL``, else 127.0.0.1:6379, else start ``redis-server``
on a free port, else an embedded fakeredis server (with a visible notice)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

DEFAULT_URL = "redis://127.0.0.1:6379/2"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1.0) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """Yield a Redis URL that answers, starting a server if needed (stopped on exit)."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not _answers(url):
            raise SystemExit(f"REDIS_URL is set but nothing answers there: {url.split('@')[-1]}")
        yield url
        return
    if _answers(DEFAULT_URL):
        yield DEFAULT_URL
        return
    server = shutil.which("redis-server")
    if server:
        port = _free_port()
        workdir = tempfile.mkdtemp(prefix="rpc-tasks-redis-")
        print(f"[demo] no Redis on 127.0.0.1:6379; starting {server} on port {port}")
        proc = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                if _answers(url):
                    break
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)
        return
    import fakeredis

    port = _free_port()
    print("[demo] NOTICE: no Redis server found or installed; using an embedded fakeredis server")
    print("[demo]         (fine for a demo, not for production or benchmarks)")
    fake = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        fake.shutdown()
        fake.server_close()
