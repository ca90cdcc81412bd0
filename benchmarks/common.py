"""Helpers shared by the benchmark orchestrator (``benchmarks.run``), the client side
(``benchmarks.client``) and the worker processes (``benchmarks.workers.*``).

Everything a worker and its client must agree on (queue names, key prefixes, streams) is
derived from two environment variables set by the orchestrator: ``BENCH_REDIS_URL`` (the
dedicated Redis DB) and ``BENCH_TAG`` (unique per ``make bench`` run).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import redis

#: Default Redis URL: DB 14 (DB 12 is used by ``benchmarks.ws_fanout``, 9 by the tests). The
#: orchestrator refuses a DB that holds other keys or has other clients connected.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
#: RabbitMQ of the ``call-rabbitmq`` path (change it with ``--rabbitmq-url`` or
#: ``BENCH_RABBITMQ_URL``). The benchmark only creates and deletes its own queues there.
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: The payload every path echoes.
MESSAGE = "hello"


def echo_worker_running() -> Callable[[], bool]:
    """For the floors' echo workers: parse ``--max-seconds`` (default 600), stop on
    SIGTERM/SIGINT; returns ``running()``, true until either happens."""
    import argparse
    import signal

    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ends = time.monotonic() + args.max_seconds
    return lambda: not stop["now"] and time.monotonic() < ends


def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)


def rabbitmq_url() -> str:
    return os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_RABBITMQ_URL)


def tag() -> str:
    value = os.environ.get("BENCH_TAG")
    if not value:
        raise SystemExit("BENCH_TAG is not set (run through `python -m benchmarks.run`)")
    return value


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_db(url: str) -> int:
    """The DB number of a ``redis://host:port/N`` URL (0 when absent)."""
    path = urlparse(url).path.strip("/")
    return int(path) if path else 0


@dataclass(frozen=True)
class Names:
    """Queue names, key prefixes and streams of one benchmark run."""

    tag: str

    @property
    def raw_requests(self) -> str:
        return f"bench:{self.tag}:raw:req"

    @property
    def raw_reply_prefix(self) -> str:
        return f"bench:{self.tag}:raw:reply:"

    @property
    def xraw_stream(self) -> str:
        return f"bench:{self.tag}:xraw:req"

    @property
    def xraw_reply_prefix(self) -> str:
        return f"bench:{self.tag}:xraw:reply:"

    @property
    def streams_stream(self) -> str:
        return f"bench:{self.tag}:streams:req"

    @property
    def streams_reply_prefix(self) -> str:
        return f"bench:{self.tag}:streams:reply:"

    @property
    def group(self) -> str:
        return "bench"

    @property
    def rpc_reply_prefix(self) -> str:
        return f"bench:{self.tag}:rpc:reply:"

    def namespace(self, kind: str) -> str:
        """Dramatiq broker namespace of a worker kind (``blocking``, ``plain``, ``results``)."""
        return f"bench-{self.tag}-{kind}"

    def queue(self, kind: str) -> str:
        return f"bench-{self.tag}-{kind}"

    def rabbitmq_queues(self) -> tuple[str, str, str]:
        """The RabbitMQ queues of the ``rabbitmq`` kind: Dramatiq's queue and its delay
        (``.DQ``) and dead-letter (``.XQ``) queues."""
        queue = self.queue("rabbitmq")
        return queue, f"{queue}.DQ", f"{queue}.XQ"


def names() -> Names:
    return Names(tag())


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v is not None and not math.isnan(v)]
    return percentile(data, 50) if data else math.nan


# -- Redis INFO commandstats ----------------------------------------------------------------


def commandstats(client: Any) -> dict[str, int]:
    """``INFO commandstats`` as ``{command: calls}`` (server-wide, every DB and client)."""
    info = client.info("commandstats")
    out: dict[str, int] = {}
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if isinstance(value, dict):
            out[name] = int(value.get("calls", 0))
    return out


#: Commands the measurement itself sends (not counted).
NOT_COUNTED = frozenset({"info"})


def commands_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per-command calls between two ``commandstats`` snapshots (INFO itself excluded)."""
    out = {}
    for name, calls in after.items():
        if name in NOT_COUNTED:
            continue
        delta = calls - before.get(name, 0)
        if delta > 0:
            out[name] = delta
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- sharing the Redis server ------------------------------------------------------------------

#: Marker key of a DB the benchmark claimed (so a DB left over by an interrupted run can be
#: told apart from someone else's data).
CLAIM_KEY = "rpc-tasks-bench:claim"


def foreign_clients(client: Any, db: int, own_name: str) -> list[str]:
    """Addresses of clients connected to ``db`` other than those named ``own_name``."""
    out = []
    for info in client.client_list():
        if int(info.get("db", -1)) == db and info.get("name") != own_name:
            out.append(f"{info.get('addr')} (cmd={info.get('cmd')}, age={info.get('age')}s)")
    return out


def claim_db(r: redis.Redis, db: int, own_name: str, tag: str) -> str | None:
    """Make sure the DB is ours to flush; returns why not, or None (and flushes leftovers of an
    earlier benchmark run)."""
    others = foreign_clients(r, db, own_name)
    if others:
        return (
            f"Redis DB {db} is in use by {len(others)} other client(s) ({'; '.join(others[:3])}). "
            "The benchmark flushes its DB: pick a free one with --redis-url "
            "redis://127.0.0.1:6379/N (or BENCH_REDIS_URL)."
        )
    size = r.dbsize()
    if size and r.get(CLAIM_KEY) is None:
        return (
            f"Redis DB {db} holds {size} keys the benchmark did not create. The benchmark flushes its DB: "
            "pick an empty one with --redis-url redis://127.0.0.1:6379/N (or BENCH_REDIS_URL)."
        )
    if size:
        r.flushdb()  # left over by an interrupted benchmark run (it carries our claim key)
    r.set(CLAIM_KEY, tag)
    return None


def release_db(r: redis.Redis, db: int, own_name: str, tag: str) -> str | None:
    """Flush the DB, unless someone else started using it meanwhile: then delete only the keys
    named after this run's tag and say so."""
    time.sleep(0.2)  # let Redis notice the connections of the processes we stopped
    others = foreign_clients(r, db, own_name)
    claim = r.get(CLAIM_KEY)
    if not others and claim == tag.encode():
        r.flushdb()
        return None
    deleted = 0
    for key in r.scan_iter(match=f"*{tag}*", count=1000):
        deleted += r.delete(key)
    if claim == tag.encode():
        r.delete(CLAIM_KEY)
    return (
        f"Redis DB {db} was not flushed at the end: {len(others)} other client(s) were using it; deleted the "
        f"{deleted} keys named after this run (library keys such as celery-task-meta-* may remain)."
    )


def cpu_sample() -> tuple[int, int]:
    """``(total, idle)`` jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), idle


def busy_between(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Machine-wide CPU busy % (all cores = 100) between two :func:`cpu_sample` s."""
    total = b[0] - a[0]
    return 100.0 * (total - (b[1] - a[1])) / total if total > 0 else 0.0


def cpu_busy_pct(seconds: float) -> float:
    """Machine-wide CPU busy % (all cores = 100) over ``seconds``."""
    first = cpu_sample()
    time.sleep(seconds)
    return busy_between(first, cpu_sample())


# -- RabbitMQ (the call-rabbitmq path) -----------------------------------------------------------


def _rabbitmq_connection(url: str) -> Any:
    import pika

    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)


def rabbitmq_check(url: str) -> tuple[str | None, str | None]:
    """``(problem, server version)``: why RabbitMQ cannot be used (or None) and its version."""
    try:
        import pika  # noqa: F401
    except ImportError:
        return "pika is not installed (pip install 'rpc-tasks[rabbitmq]')", None
    try:
        conn = _rabbitmq_connection(url)
    except Exception as exc:
        host = urlparse(url).hostname
        return (
            f"RabbitMQ at {host}:{urlparse(url).port or 5672} is not reachable ({type(exc).__name__})",
            None,
        )
    try:
        version = conn._impl.server_properties.get("version")
        return None, version.decode() if isinstance(version, bytes) else version
    finally:
        conn.close()


def delete_rabbitmq_queues(url: str, queues: Sequence[str]) -> list[str]:
    """Delete ``queues`` (absent ones are fine); returns those that still exist afterwards."""
    import pika

    conn = _rabbitmq_connection(url)
    try:
        channel = conn.channel()
        for queue in queues:
            channel.queue_delete(queue=queue)
        left = []
        for queue in queues:
            try:
                channel.queue_declare(queue=queue, passive=True)
                left.append(queue)
            except pika.exceptions.ChannelClosedByBroker:  # 404: gone, as it should be
                channel = conn.channel()
        return left
    finally:
        conn.close()


# -- CPU time from /proc ----------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def session_cpu_ticks(session_id: int) -> tuple[int, list[int]]:
    """CPU ticks (utime + stime + cutime + cstime) of every process in session ``session_id``.

    Each worker is started in its own session, so this covers the process, its children
    (e.g. Dramatiq's forked worker processes) and children that exited and were reaped (their
    time moves into the parent's cutime/cstime). Returns ``(ticks, pids)``.
    """
    total = 0
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or len(fields) < 15:
            continue
        # After ')': state=0 ppid=1 pgrp=2 session=3 ... utime=11 stime=12 cutime=13 cstime=14
        if int(fields[3]) != session_id:
            continue
        pids.append(int(entry))
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total, pids


def session_cpu_ns(session_id: int) -> int:
    """On-CPU nanoseconds of every live thread of every process in session ``session_id``
    (``/proc/<pid>/task/<tid>/schedstat``): a finer cross-check of :func:`session_cpu_ticks`,
    which counts whole clock ticks. Threads that exit in between are not counted."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or len(fields) < 4 or int(fields[3]) != session_id:
            continue
        try:
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{entry}/task/{tid}/schedstat", encoding="ascii") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


# -- progress bar -----------------------------------------------------------------------------


class _TextBar:
    """A minimal progress bar on stderr (used when tqdm is not installed)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total = max(1, total)
        self.desc = desc
        self.n = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._last_pct = -1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        pct = int(100 * self.n / self.total)
        if self.tty:
            if now - self._last >= 0.1 or self.n >= self.total:
                self._last = now
                filled = int(30 * self.n / self.total)
                sys.stderr.write(
                    f"\r  {self.desc:<18} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% "
                    f"{self.n}/{self.total}"
                )
                sys.stderr.flush()
        elif pct // 25 > self._last_pct // 25 or self.n >= self.total:
            self._last_pct = pct
            sys.stderr.write(f"  {self.desc}: {pct}% ({self.n}/{self.total})\n")
            sys.stderr.flush()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress(total: int, desc: str) -> Any:
    """A progress bar on stderr: tqdm when installed (and stderr is a terminal), else a simple
    textual one (a line per quarter when stderr is not a terminal, e.g. in CI logs)."""
    if not sys.stderr.isatty():
        return _TextBar(total, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="call", leave=False, dynamic_ncols=True)
