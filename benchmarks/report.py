"""Summaries, the results table, the JSON file and the latency CDF plot."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.common import median, percentile

#: Table order and what each path is compared with ("floor").
PATH_ORDER = (
    "raw",
    "call",
    "call-plain",
    "send",
    "inflight",
    "dramatiq-results",
    "celery",
    "streams-raw",
    "streams",
)
FLOOR_OF = {"raw": "raw", "streams": "streams-raw"}
DESCRIPTIONS = {
    "raw": "floor: client LPUSH+BLPOP, echo process BLPOP+LPUSH (redis-py)",
    "call": "rpc-tasks @rpc_actor .call(), setup_broker() default (BlockingRedisBroker)",
    "call-plain": "rpc-tasks @rpc_actor .call(), setup_broker(dramatiq RedisBroker)",
    "send": ".send() on the call worker: latency = enqueue only; calls/s = sent + processed",
    "inflight": ".call_many() batches from one thread (calls/s only)",
    "dramatiq-results": "Dramatiq Results: @dramatiq.actor(store_results=True), get_result(block=True)",
    "celery": "Celery 5, Redis broker + backend, -P solo, .delay().get()",
    "streams-raw": "Streams floor: client XADD+BLPOP, server XREADGROUP BLOCK+LPUSH+XACK",
    "streams": "WebSocketRPCClient.call('echo') against an RPCServer process",
}


def floor_of(path: str) -> str:
    return FLOOR_OF.get(path, "raw")


def summarize(raw: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    """Per-run statistics and their medians for one path's client output."""
    out: dict[str, Any] = {"path": raw.get("path"), "description": DESCRIPTIONS.get(str(raw.get("path")), "")}
    for key in ("error", "na", "skipped", "ready_s"):
        if key in raw:
            out[key] = raw[key]
    runs: list[dict[str, Any]] = []
    commands_total: dict[str, int] = {}
    total_calls = 0
    for run in raw.get("runs", []):
        lat = run.get("latencies_ms") or []
        calls = int(run["calls"])
        cmds = sum(run.get("commands", {}).values())
        total_calls += calls
        for name, count in run.get("commands", {}).items():
            commands_total[name] = commands_total.get(name, 0) + count
        entry = {
            "calls": calls,
            "elapsed_s": run["elapsed_s"],
            "calls_per_s": calls / run["elapsed_s"] if run["elapsed_s"] > 0 else math.nan,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "mean_ms": sum(lat) / len(lat) if lat else math.nan,
            "max_ms": max(lat) if lat else math.nan,
            "redis_cmds_per_call": cmds / calls if calls else math.nan,
        }
        for extra in ("enqueue_per_s", "drain_after_last_send_s"):
            if extra in run:
                entry[extra] = run[extra]
        if run.get("batch_ms"):
            entry["batch_p50_ms"] = percentile(run["batch_ms"], 50)
            entry["batch_p99_ms"] = percentile(run["batch_ms"], 99)
        runs.append(entry)
    out["runs"] = runs
    for key in (
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "max_ms",
        "calls_per_s",
        "redis_cmds_per_call",
        "enqueue_per_s",
        "batch_p50_ms",
        "batch_p99_ms",
    ):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = median(values)
    if total_calls:
        out["redis_cmds_per_call_by_command"] = {
            name: round(count / total_calls, 3) for name, count in commands_total.items()
        }
    first = raw.get("first_call_ms") or []
    out["first_call_ms"] = [round(v, 3) for v in first]
    out["first_call_p50_ms"] = median(first) if first else math.nan
    out["first_call_max_ms"] = max(first) if first else math.nan
    if idle:
        out["idle"] = idle
    out["samples_ms"] = [round(v, 4) for run in raw.get("runs", []) for v in (run.get("latencies_ms") or [])]
    return out


def add_ratios(summaries: dict[str, dict[str, Any]]) -> None:
    for name, s in summaries.items():
        floor = summaries.get(floor_of(name))
        s["floor"] = floor_of(name)
        s["p50_ratio_to_floor"] = _ratio(s.get("p50_ms"), floor and floor.get("p50_ms"))
        s["first_call_ratio_to_floor"] = _ratio(
            s.get("first_call_p50_ms"), floor and floor.get("first_call_p50_ms")
        )
        s["first_call_ratio_to_own_p50"] = _ratio(s.get("first_call_p50_ms"), s.get("p50_ms"))


def _ratio(a: Any, b: Any) -> float:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or math.isnan(b):
        return math.nan
    return float(a) / float(b)


def _f(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "—"
    return format(value, fmt)


COLUMNS = (
    ("path", 16, "<"),
    ("p50 ms", 7, ">"),
    ("p95 ms", 7, ">"),
    ("p99 ms", 7, ">"),
    ("calls/s", 8, ">"),
    ("cmds/call", 9, ">"),
    ("idle CPU%", 9, ">"),
    ("idle cmd/s", 10, ">"),
    ("p50/floor", 16, ">"),
    ("1st-idle ms", 11, ">"),
    ("1st/floor", 9, ">"),
)


def _cpu_cell(idle: dict[str, Any]) -> str:
    """Idle CPU from /proc stat ticks; below one tick it says "<resolution"."""
    pct = idle.get("cpu_pct")
    if not isinstance(pct, (int, float)):
        return "—"
    if pct == 0 and idle.get("cpu_resolution_pct"):
        return f"<{idle['cpu_resolution_pct']:.2f}"
    return f"{pct:.2f}"


def table(summaries: dict[str, dict[str, Any]]) -> str:
    def row(cells: list[str]) -> str:
        return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS, strict=True))

    lines = [row([c[0] for c in COLUMNS]), row(["-" * c[1] for c in COLUMNS])]
    for name in PATH_ORDER:
        s = summaries.get(name)
        if s is None:
            continue
        if "skipped" in s or "na" in s or "error" in s:
            reason = s.get("skipped") or s.get("na") or f"error: {s.get('error')}"
            lines.append(f"{name:<16}  {str(reason)[:110]}")
            continue
        idle = s.get("idle") or {}
        floor = s.get("floor")
        ratio = s.get("p50_ratio_to_floor")
        first_ratio = s.get("first_call_ratio_to_floor")
        if name == floor:
            ratio_cell = first_cell = "floor"
        else:
            ratio_cell = "—" if _f(ratio, ".2f") == "—" else f"{ratio:.2f}x {floor}"
            first_cell = "—" if _f(first_ratio, ".1f") == "—" else f"{first_ratio:.1f}x"
        lines.append(
            row(
                [
                    name,
                    _f(s.get("p50_ms"), ".3f"),
                    _f(s.get("p95_ms"), ".3f"),
                    _f(s.get("p99_ms"), ".3f"),
                    _f(s.get("calls_per_s"), ".0f"),
                    _f(s.get("redis_cmds_per_call"), ".2f"),
                    _cpu_cell(idle),
                    _f(idle.get("redis_cmds_per_s"), ".1f"),
                    ratio_cell,
                    _f(s.get("first_call_p50_ms"), ".2f"),
                    first_cell,
                ]
            )
        )
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, Any]], path: str, title: str) -> str | None:
    """Latency CDF of every path that has per-call samples; returns an error text or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib not available ({exc}); pip install matplotlib"
    try:
        fig, ax = plt.subplots(figsize=(10, 6))
        for name in PATH_ORDER:
            s = summaries.get(name)
            if not s or not s.get("samples_ms"):
                continue
            data = sorted(s["samples_ms"])
            n = len(data)
            label = f"{name} (p50 {s['p50_ms']:.2f} ms)"
            style = "-"
            if name == "send":
                label, style = f"send, enqueue only (p50 {s['p50_ms']:.2f} ms)", "--"
            elif name in ("raw", "streams-raw"):
                style = ":"
            ax.step(data, [(i + 1) / n for i in range(n)], where="post", label=label, linestyle=style)
        ax.set_xscale("log")
        ax.set_xlabel("latency per call (ms, log scale)")
        ax.set_ylabel("fraction of calls")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as exc:  # a broken plot must not lose the results
        return f"plot failed: {type(exc).__name__}: {exc}"
    return None
