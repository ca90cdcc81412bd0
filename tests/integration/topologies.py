"""Private Redis topologies for the scale-out tests: a 3-master Cluster and a Sentinel group
(master, replica, three sentinels), each on free loopback ports, started and stopped by the test
(bounded waits; every process killed and every directory removed even when a test fails)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import PrivateRedis, free_port


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")


def _ping(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if redis.Redis(port=port, socket_timeout=1).ping():
                return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@contextlib.contextmanager
def private_cluster(masters: int = 3) -> Iterator[list[int]]:
    """``masters`` cluster-enabled ``redis-server`` processes joined with ``redis-cli --cluster
    create`` (no replicas); yields their ports once every slot is served."""
    _need("redis-server")
    _need("redis-cli")
    nodes = [
        PrivateRedis("--cluster-enabled", "yes", "--cluster-node-timeout", "2000") for _ in range(masters)
    ]
    for node in nodes:  # each node keeps its nodes.conf in its own directory
        node.port = _cluster_port()
        node.extra += ["--cluster-config-file", str(Path(node.dir) / "nodes.conf")]
    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while True:
            infos = [redis.Redis(port=node.port).cluster("info") for node in nodes]
            if all(info.get("cluster_state") == "ok" for info in infos):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready: {infos}")
            time.sleep(0.1)
        yield [node.port for node in nodes]
    finally:
        for node in nodes:
            node.__exit__(None, None, None)


class SentinelGroup:
    """A master, ``replicas`` replicas and three sentinels (quorum 2) watching ``mymaster``."""

    SERVICE = "mymaster"

    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, replicas: int = 1) -> None:
        _need("redis-server")
        self.master = PrivateRedis()
        follow = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replicas = [PrivateRedis(*follow) for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dirs: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/{db}?socket_timeout=5"

    def start(self) -> None:
        self.master.start()
        for replica in self.replicas:
            replica.start()
        _ping(self.master.port)
        deadline = time.monotonic() + 20
        for replica in self.replicas:
            while redis.Redis(port=replica.port).info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("a replica did not sync")
                time.sleep(0.05)
        for port in self.sentinel_ports:
            workdir = tempfile.mkdtemp(prefix="rpc-tasks-sentinel-")
            self.dirs.append(workdir)
            conf = Path(workdir) / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self.procs.append(
                subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
            )
        for port in self.sentinel_ports:
            _ping(port)
        deadline = time.monotonic() + 20  # every sentinel sees the replica and the other two
        while True:
            try:
                ready = all(
                    int(redis.Redis(port=port).sentinel_master(self.SERVICE).get("num-other-sentinels", 0))
                    == 2
                    and redis.Redis(port=port).sentinel_slaves(self.SERVICE)
                    for port in self.sentinel_ports
                )
            except redis.RedisError:
                ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not discover each other")
            time.sleep(0.1)

    def master_port(self) -> int:
        _host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(self.SERVICE)
        return int(port)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        for node in (self.master, *self.replicas):
            node.__exit__(None, None, None)
        for workdir in self.dirs:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def migrate_slot(ports: list[int], slot: int) -> tuple[int, int]:
    """Move ``slot`` (and its keys) from its owner to another master, the way ``redis-cli
    --cluster reshard`` does: ``SETSLOT IMPORTING``/``MIGRATING``, ``MIGRATE`` of its keys,
    ``SETSLOT NODE`` everywhere. Returns (source port, target port)."""
    clients = {port: redis.Redis(port=port, decode_responses=True) for port in ports}
    ids = {port: client.execute_command("CLUSTER", "MYID") for port, client in clients.items()}
    owner = next(port for port, client in clients.items() if _owns(client, slot))
    target = next(port for port in ports if port != owner)
    src, dst = clients[owner], clients[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    time.sleep(0.3)  # calls in flight now meet ASK (new keys) while the slot is half-moved
    while True:
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            break
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for client in (dst, src, *[c for p, c in clients.items() if p not in (owner, target)]):
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    return owner, target


def _owns(client: redis.Redis, slot: int) -> bool:
    for start, end, *rest in client.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            me = client.execute_command("CLUSTER", "MYID")
            return bool(rest[0][2] == me)
    return False
