"""The recommended large deployment, in small, on loopback, without Docker::

    python -m examples.scale_out.run            # RabbitMQ from $AMQP_URL (default guest@127.0.0.1)

It starts a private 3-master Redis Cluster (``redis-server --cluster-enabled yes`` on free ports,
joined with ``redis-cli --cluster create``), two Dramatiq worker processes on RabbitMQ
(``examples/scale_out/tasks.py``; replies and the rate limit on the cluster) and two WebSocket
server instances (``rpc-tasks ws``, their Streams on the cluster under one hash tag), runs a short
smoke workload, prints what it did, and stops everything (also on failure or Ctrl-C).

Needs ``redis-server`` and ``redis-cli`` (Redis >= 7), a RabbitMQ, and ``rpc-tasks[rabbitmq,websocket]``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
SECRET = "scale-out-example-secret-0123456789"
#: One hash tag for the Streams keys (request stream, its dead letters, reply keys): the
#: server's ack-and-reply script then touches one slot.
TAG = "ws"


def main() -> int:
    """Start, exercise, stop. Exit status 0 when every step worked."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            print(f"{binary} is not installed", file=sys.stderr)
            return 2
    procs: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="rpc-tasks-scale-out-"))
    queue = f"scale-out-{uuid.uuid4().hex[:8]}"
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    try:
        ports = start_cluster(procs, workdir)
        cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DRAMATIQ_BROKER_URL": amqp_url,
            "WEBSOCKET_RPC_REDIS_URL": cluster_url,
            "WEBSOCKET_RPC_REQUEST_STREAM": f"stream:requests{{{TAG}}}",
            "WEBSOCKET_RPC_RESPONSE_KEY_PREFIX": f"list:response:{{{TAG}}}:",
            "WEBSOCKET_RPC_WEBSOCKET_SECRET": SECRET,
            "SCALE_OUT_QUEUE": queue,
        }
        os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
        print(f"cluster: 3 masters on ports {ports} ({cluster_url})")
        bin_dir = Path(sys.executable).parent
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dramatiq",
                        "examples.scale_out.tasks",
                        "--processes",
                        "1",
                        "--threads",
                        "2",
                    ],
                    env=env,
                    cwd=ROOT,
                )
            )
        ws_ports = [free_port(), free_port()]
        for name, port in zip(("ws-a", "ws-b"), ws_ports, strict=True):
            command = [str(bin_dir / "rpc-tasks"), "ws", "--host", "127.0.0.1", "--port", str(port)]
            procs.append(subprocess.Popen([*command, "--instance-id", name], env=env, cwd=ROOT))
        for port in ws_ports:
            wait_port(port, 30)
        print(f"workers: 2 Dramatiq processes on RabbitMQ queue {queue!r}; WebSocket instances on {ws_ports}")
        workload(ws_ports)
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        delete_queues(amqp_url, queue)
        shutil.rmtree(workdir, ignore_errors=True)


def workload(ws_ports: list[int]) -> None:
    """The smoke workload; raises on anything unexpected."""
    from examples.scale_out.tasks import AddParams, add, limited_add
    from rpc_tasks import NotificationRequest, NotificationResponse, WebSocketRPCClient

    started = time.monotonic()
    results = [add.call(AddParams(a=i, b=1), timeout=30) for i in range(20)]
    assert [r.total for r in results] == [i + 1 for i in range(20)]
    many = add.call_many([AddParams(a=i, b=0) for i in range(50)], timeout=30)
    assert [r.total for r in many] == list(range(50))
    pids = {r.pid for r in results + many}
    print(
        f".call() x20 and call_many x50 over RabbitMQ, replies on the cluster: ok in "
        f"{time.monotonic() - started:.2f} s, {len(pids)} worker processes answered"
    )

    started = time.monotonic()
    limited = limited_add.call_many([AddParams(a=i, b=0) for i in range(30)], timeout=60)
    assert [r.total for r in limited] == list(range(30))
    print(f"rate_limit='20/s' on the cluster: 30 calls took {time.monotonic() - started:.2f} s (>= ~1.45 s)")

    from websockets.sync.client import connect

    from rpc_tasks.websocket.auth import make_token

    client = WebSocketRPCClient()
    try:
        assert client.health_check(timeout=20)
        with connect(f"ws://127.0.0.1:{ws_ports[1]}/ws?token={make_token('alice', SECRET)}") as ws:
            welcome = json.loads(ws.recv(timeout=10))
            assert welcome["type"] == "welcome", welcome
            time.sleep(0.5)  # presence registered
            delivered = 0
            for i in range(5):
                result = client.call(
                    "send_notification",
                    NotificationRequest(
                        user_id="alice", notification_type="smoke", title=f"#{i}", message="hi"
                    ),
                    result_model=NotificationResponse,
                    timeout=20,
                )
                frame = json.loads(ws.recv(timeout=10))
                assert result.delivered and frame["type"] == "notification", (result, frame)
                delivered += 1
        print(
            f"WebSocket: alice on instance ws-b got {delivered} of 5 notifications sent through the "
            "Streams of either instance (presence, fan-out and replies on the cluster)"
        )
    finally:
        client.close()


def start_cluster(procs: list[subprocess.Popen[bytes]], workdir: Path) -> list[int]:
    """Three cluster-enabled redis-servers, joined; returns their ports once all slots are served."""
    ports = [free_port(bus=True) for _ in range(3)]
    for port in ports:
        node_dir = workdir / str(port)
        node_dir.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(node_dir),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
    for port in ports:
        wait_port(port, 15)
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *[f"127.0.0.1:{p}" for p in ports],
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 30
    while not all(redis.Redis(port=p).cluster("info").get("cluster_state") == "ok" for p in ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not become ready")
        time.sleep(0.1)
    return ports


def free_port(bus: bool = False) -> int:
    """A free loopback port (with ``bus``: one whose cluster bus port, +10000, is usable too)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not bus or port + 10000 <= 65535:
            return port


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def delete_queues(amqp_url: str, queue: str) -> None:
    try:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        connection.close()
    except Exception as exc:
        print(f"(could not delete the example's queues: {exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
