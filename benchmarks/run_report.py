"""What :mod:`benchmarks.run` writes around :mod:`benchmarks.report`'s table: the package
versions and redacted URLs of the results' metadata, the standard notes under the table, and
the JSON cleaning (NaN -> null, 4 decimals).
"""

from __future__ import annotations

import argparse
import math
import platform
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from benchmarks.common import CLK_TCK


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "rpc-tasks",
        "dramatiq",
        "redis",
        "hiredis",
        "pydantic",
        "pika",
        "celery",
        "kombu",
        "taskiq",
        "taskiq-redis",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def json_default(obj: Any) -> Any:
    return str(obj)


def clean_nan(value: Any) -> Any:
    """NaN -> null (valid JSON), floats to 4 decimals."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_nan(v) for v in value]
    return value


def standard_notes(
    summaries: dict[str, dict[str, Any]], idle: dict[str, dict[str, Any]], args: argparse.Namespace
) -> list[str]:
    notes = [
        "Latencies: medians over runs of each run's percentile. p50/floor: p50 over the raw "
        "LPUSH/BLPOP floor (streams: over the raw Streams floor); 1st/floor: median first call "
        "after idle over the floor's.",
        "cmds/call: INFO commandstats delta over the timed runs / calls, server-wide (commands run "
        "inside Lua scripts and MULTI/EXEC count too; any other Redis client's traffic as well).",
        "idle CPU%: worker process tree over the idle window, one core = 100 %; /proc stat ticks "
        f"give a resolution of {100.0 / CLK_TCK / args.idle_seconds:.2f} % over {args.idle_seconds:g} s. "
        "idle cmd/s is server-wide.",
    ]
    if "send" in summaries and "p50_ms" in summaries["send"]:
        s = summaries["send"]
        notes.append(
            f"send: p50/p95/p99 time one .send() (enqueue only, {s.get('enqueue_per_s', math.nan):.0f} "
            "msgs/s enqueued); calls/s counts until the worker has processed them all (broker.join; "
            f"{s.get('drain_after_last_send_s', math.nan) * 1000:.0f} ms after the last send)."
        )
    if "dramatiq-send" in summaries and "p50_ms" in summaries["dramatiq-send"]:
        s = summaries["dramatiq-send"]
        notes.append(
            f"dramatiq-send: measured like send, plain @dramatiq.actor on Dramatiq's RedisBroker "
            f"({s.get('enqueue_per_s', math.nan):.0f} msgs/s enqueued; processed "
            f"{s.get('drain_after_last_send_s', math.nan) * 1000:.0f} ms after the last send). Its polling "
            "consumer treats a full prefetch buffer (2 x threads messages) like an empty queue and sleeps "
            "its back-off (5-10 ms, doubling per miss, up to 1 s) before it fetches again."
        )
    if "inflight" in summaries and "batch_p50_ms" in summaries["inflight"]:
        s = summaries["inflight"]
        notes.append(
            f"inflight: call_many() of {args.batch} calls at a time from one thread; one batch took "
            f"p50 {s['batch_p50_ms']:.1f} ms, p99 {s.get('batch_p99_ms', math.nan):.1f} ms."
        )
    if "inflight-dramatiq" in summaries and "batch_p50_ms" in summaries["inflight-dramatiq"]:
        s = summaries["inflight-dramatiq"]
        notes.append(
            f"inflight-dramatiq: {args.batch} x actor.send(), then get_result(block=True) of each, from "
            f"one thread; one batch took p50 {s['batch_p50_ms']:.1f} ms, "
            f"p99 {s.get('batch_p99_ms', math.nan):.1f} ms."
        )
    if "call-rabbitmq" in summaries and "p50_ms" in summaries["call-rabbitmq"]:
        notes.append(
            "call-rabbitmq: messages travel over RabbitMQ, replies over Redis; its cmds/call and idle "
            "cmd/s count only Redis commands (RabbitMQ traffic is not counted)."
        )
    if idle:
        precise = ", ".join(f"{g} {v['cpu_pct_schedstat']:.3f}" for g, v in idle.items())
        notes.append(f"idle CPU % per worker from schedstat (ns resolution, cross-check): {precise}.")
    if "rpc" in idle and ("send" in summaries or "inflight" in summaries):
        notes.append("call, send and inflight share one worker, so they share its idle figures.")
    if "dramatiq-results" in idle and "inflight-dramatiq" in summaries:
        notes.append(
            "dramatiq-results and inflight-dramatiq share one worker, so they share its idle figures."
        )
    return notes
