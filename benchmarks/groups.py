"""The benchmark's paths grouped by the worker processes they are measured against, and the
command that starts each worker (:mod:`benchmarks.run` starts them, one group at a time;
:mod:`benchmarks.placement` and :mod:`benchmarks.obs_cost` reuse them).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass

from benchmarks import arq_env
from benchmarks.common import free_port


@dataclass(frozen=True)
class Group:
    """Paths measured together, their timed runs interleaved by one client process, against
    the worker processes they need (all running at once)."""

    name: str
    paths: tuple[str, ...]


#: The worker process (tree) each path is measured against.
WORKER_OF = {
    "raw": "raw",
    "scripts-floor": "scripts-floor",
    "call": "rpc",
    "send": "rpc",
    "plain-send": "rpc",
    "inflight": "rpc",
    "acall": "rpc",
    "acall-1k": "rpc",
    "acall-10k": "rpc",
    "call-plain": "rpc-plain",
    "call-rabbitmq": "rpc-rabbitmq",
    "dramatiq-send": "dramatiq-plain",
    "dramatiq-results": "dramatiq-results",
    "inflight-dramatiq": "dramatiq-results",
    "celery": "celery",
    "taskiq": "taskiq",
    "taskiq-fast": "taskiq",
    "taskiq-1k": "taskiq",
    "taskiq-10k": "taskiq",
    "arq": "arq",
    "arq-fast": "arq-fast",
    "arq-1k": "arq-fast",
    "arq-10k": "arq-fast",
    "streams-raw": "streams-raw",
    "streams": "streams",
    "obs-base": "rpc",
    "call-otel-api": "rpc-otel-api",
    "call-otel-sdk": "rpc-otel-sdk",
    "call-metrics": "rpc-metrics",
    "call-metrics-ours": "rpc-metrics-ours",
}
#: The floors share a group (and so interleaved runs) with the paths whose goals are ratios to
#: them: on a noisy machine, ratios of runs minutes apart move with the machine, not the code.
GROUPS = (
    Group(
        "rpc",
        ("raw", "scripts-floor", "call", "send", "plain-send", "inflight", "acall", "acall-1k", "acall-10k"),
    ),
    Group("rpc-plain", ("call-plain",)),
    Group("rpc-rabbitmq", ("call-rabbitmq",)),
    Group("dramatiq-plain", ("dramatiq-send",)),
    Group("dramatiq-results", ("dramatiq-results", "inflight-dramatiq")),
    Group("celery", ("celery",)),
    Group("taskiq", ("taskiq", "taskiq-fast", "taskiq-1k", "taskiq-10k")),
    # arq needs redis-py < 6: its workers and clients run in .venv-arq (arq_env.py). Two groups:
    # the 1 ms worker's idle polling (~900 commands/s) would count in the default path's cmds/call.
    Group("arq", ("arq",)),
    Group("arq-fast", ("arq-fast", "arq-1k", "arq-10k")),
    Group("streams", ("streams-raw", "streams")),
    # The cost of tracing and metrics: each .call() path against its baseline, runs interleaved.
    Group(
        "observability", ("obs-base", "call-otel-api", "call-otel-sdk", "call-metrics", "call-metrics-ours")
    ),
)
ALL_PATHS = tuple(p for g in GROUPS for p in g.paths)
#: Groups whose comparison library is an optional bench dependency: (modules, what to say).
OPTIONAL_PACKAGES = {"taskiq": (("taskiq", "taskiq_redis"), "taskiq/taskiq-redis")}


def worker_command(
    kind: str, threads: int, lifetime: float, tag: str, python: str | None = None
) -> tuple[list[str], dict[str, str]]:
    group = kind  # the worker kinds of WORKER_OF
    py = python or sys.executable
    if group in arq_env.WORKER_KINDS:
        return arq_env.worker_command(py, group)
    if group == "raw":
        return [py, "-m", "benchmarks.workers.raw_echo", "--max-seconds", str(lifetime)], {}
    if group == "streams-raw":
        return [py, "-m", "benchmarks.workers.streams_raw", "--max-seconds", str(lifetime)], {}
    if group == "scripts-floor":
        return [py, "-m", "benchmarks.workers.scripts_echo", "--max-seconds", str(lifetime)], {}
    kinds = {
        "rpc": "blocking",
        "rpc-plain": "plain",
        "rpc-rabbitmq": "rabbitmq",
        "dramatiq-plain": "dramatiq",
        "dramatiq-results": "results",
        "rpc-otel-api": "otel-api",
        "rpc-otel-sdk": "otel-sdk",
        "rpc-metrics": "metrics",
        "rpc-metrics-ours": "metrics-ours",
    }
    if group in kinds:
        kind = kinds[group]
        cmd = [
            py,
            "-m",
            "dramatiq",
            "benchmarks.workers.dramatiq_app",
            "--processes",
            "1",
            "--threads",
            str(threads),
            "--worker-shutdown-timeout",
            "5000",
        ]
        extra = {"BENCH_DRAMATIQ_KIND": kind}
        if kind == "metrics":  # Dramatiq's exposition server: a free port, a private folder
            extra |= {
                "dramatiq_prom_port": str(free_port()),
                "dramatiq_prom_host": "127.0.0.1",
                "dramatiq_prom_db": tempfile.mkdtemp(prefix=f"bench-{tag}-prom-"),
            }
        return cmd, extra
    if group == "celery":
        cmd = [
            py,
            "-m",
            "celery",
            "-A",
            "benchmarks.workers.celery_app",
            "worker",
            "-P",
            "solo",
            "--loglevel",
            "WARNING",
            "-n",
            f"bench-{tag}@%h",
        ]
        return cmd, {}
    if group == "taskiq":
        cmd = [
            py,
            "-m",
            "taskiq",
            "worker",
            "benchmarks.workers.taskiq_app:broker",
            "--workers",
            "1",
            "--log-level",
            "WARNING",
        ]
        return cmd, {}
    if group == "streams":
        cmd = [
            py,
            "-m",
            "rpc_tasks.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--app",
            "benchmarks.workers.streams_app:make_server",
            "--concurrency",
            str(threads),
        ]
        return cmd, {}
    raise ValueError(group)
