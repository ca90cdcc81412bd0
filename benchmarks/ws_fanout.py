"""Notifications per second to 1,000 connected WebSocket clients (one server process).

    python -m benchmarks.ws_fanout [--clients 1000] [--notifications 2000] [--broadcasts 20]

Measures (a) ``send_notification`` calls to distinct connected users, made by 8 caller threads
through the Streams client, and (b) ``broadcast`` to all clients (frames delivered per second).
Uses Redis DB 12 and unique stream/channel names.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import free_port
from rpc_tasks import (
    BroadcastRequest,
    BroadcastResponse,
    NotificationRequest,
    NotificationResponse,
    WebSocketRPCClient,
    WebSocketRPCConfig,
)
from rpc_tasks.websocket.auth import make_token

SECRET = "bench-secret-0123456789"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--notifications", type=int, default=2000)
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.clients * 2 + 256)), hard))
    tag = uuid.uuid4().hex[:8]
    config = WebSocketRPCConfig(
        redis_url=args.redis_url,
        websocket_secret=SECRET,
        request_stream=f"bench:{tag}:req",
        response_key_prefix=f"bench:{tag}:resp:",
        broadcast_channel=f"bench:{tag}:bc",
        redis_max_connections=64,
    )
    port = free_port()
    env = dict(os.environ)
    for key, value in config.model_dump(mode="json").items():
        env[f"WEBSOCKET_RPC_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rpc_tasks.cli",
            "--log-level",
            "WARNING",
            "ws",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        start_new_session=True,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        received = [0]
        all_connected = threading.Event()
        stop = threading.Event()

        async def clients() -> None:
            from websockets.asyncio.client import connect

            ready = [0]

            async def one(i: int) -> None:
                url = f"ws://127.0.0.1:{port}/ws?token={make_token(f'u{i}', SECRET)}"
                async with connect(url, max_size=None, ping_interval=None, open_timeout=60) as ws:
                    await ws.recv()  # welcome
                    ready[0] += 1
                    if ready[0] == args.clients:
                        all_connected.set()
                    while not stop.is_set():
                        try:
                            await asyncio.wait_for(ws.recv(), 0.5)
                            received[0] += 1
                        except asyncio.TimeoutError:
                            continue

            await asyncio.gather(*(one(i) for i in range(args.clients)), return_exceptions=True)

        thread = threading.Thread(target=lambda: asyncio.run(clients()), daemon=True)
        t0 = time.perf_counter()
        thread.start()
        if not all_connected.wait(180):
            print("clients did not all connect", file=sys.stderr)
            return 1
        print(f"{args.clients} clients connected in {time.perf_counter() - t0:.1f}s")
        rpc = WebSocketRPCClient(config)

        def notify(i: int) -> bool:
            req = NotificationRequest(
                user_id=f"u{i % args.clients}", notification_type="bench", title="t", message="m"
            )
            return rpc.call("send_notification", req, NotificationResponse, timeout=30).delivered

        notify(0)
        time.sleep(0.5)
        base = received[0]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            delivered = sum(pool.map(notify, range(args.notifications)))
        elapsed = time.perf_counter() - t0
        deadline = time.time() + 10
        while received[0] - base < args.notifications and time.time() < deadline:
            time.sleep(0.05)
        print(
            f"send_notification: {args.notifications} calls in {elapsed:.2f}s = "
            f"{args.notifications / elapsed:.0f} notifications/s (delivered={delivered}, "
            f"frames received={received[0] - base})"
        )
        base = received[0]
        t0 = time.perf_counter()
        for _ in range(args.broadcasts):
            rpc.call(
                "broadcast",
                BroadcastRequest(event_type="bench", payload={"x": 1}),
                BroadcastResponse,
                timeout=30,
            )
        target = args.broadcasts * args.clients
        while received[0] - base < target and time.perf_counter() - t0 < 60:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        print(
            f"broadcast: {args.broadcasts} x {args.clients} clients = {received[0] - base} frames in "
            f"{elapsed:.2f}s = {(received[0] - base) / elapsed:.0f} frames/s"
        )
        stop.set()
        thread.join(5)
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())
