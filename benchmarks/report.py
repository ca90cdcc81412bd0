"""Summaries, the results table, the JSON file and the latency CDF plot."""

from __future__ import annotations

import math
from typing import Any

from benchmarks import aio_report
from benchmarks.common import median, percentile

#: Table order and what each path is compared with ("floor").
PATH_ORDER = (
    "raw",
    "scripts-floor",
    "call",
    "call-plain",
    "call-rabbitmq",
    "send",
    "plain-send",
    "dramatiq-send",
    "inflight",
    "acall",
    "acall-1k",
    "acall-10k",
    "inflight-dramatiq",
    "dramatiq-results",
    "celery",
    "taskiq",
    "taskiq-fast",
    "taskiq-1k",
    "taskiq-10k",
    "arq",
    "arq-fast",
    "arq-1k",
    "arq-10k",
    "streams-raw",
    "streams",
    "obs-base",
    "call-otel-api",
    "call-otel-sdk",
    "call-metrics",
    "call-metrics-ours",
)
FLOOR_OF = {"raw": "raw", "streams": "streams-raw"}
DESCRIPTIONS = {
    "raw": "floor: client LPUSH+BLPOP, echo process BLPOP+LPUSH (redis-py)",
    "scripts-floor": "a .call()'s round trips with Dramatiq's Lua scripts and message JSON, no Dramatiq "
    "worker/middleware or rpc-tasks code (client EVALSHA enqueue+BLPOP; echo BLPOP wake+fetch, ack+reply)",
    "call": "rpc-tasks @rpc_actor .call(), setup_broker() default (BlockingRedisBroker)",
    "call-plain": "rpc-tasks @rpc_actor .call(), setup_broker(dramatiq RedisBroker)",
    "call-rabbitmq": "rpc-tasks @rpc_actor .call(), setup_broker(dramatiq RabbitmqBroker); replies over "
    "Redis (cmds/call and idle cmd/s: Redis only)",
    "send": ".send() on the call worker: latency = enqueue only; calls/s = sent + processed",
    "plain-send": "plain @dramatiq.actor .send() on the same broker and worker as send, measured like send",
    "dramatiq-send": "plain @dramatiq.actor .send(), Dramatiq RedisBroker, measured like send",
    "inflight": ".call_many() batches from one thread (calls/s only)",
    "acall": "await .acall(), one at a time, one event loop (call's worker)",
    "acall-1k": "1,000 .acall()s kept in flight from one loop (calls/s, loop lag)",
    "acall-10k": "10,000 .acall()s at once from one loop (calls/s, connections, RSS, loop lag)",
    "inflight-dramatiq": "Dramatiq Results: batches of .send(), then get_result(block=True) of each "
    "(calls/s only)",
    "dramatiq-results": "Dramatiq Results: @dramatiq.actor(store_results=True), get_result(block=True)",
    "celery": "Celery 5, Redis broker + backend, -P solo, .delay().get()",
    "taskiq": "Taskiq + taskiq-redis (RedisStreamBroker, RedisAsyncResultBackend), "
    "await (await echo.kiq(x)).wait_result() (check_interval 0.2 s)",
    "taskiq-fast": "the same with wait_result(check_interval=0)",
    "taskiq-1k": "1,000 Taskiq calls at once from one loop (default check_interval)",
    "taskiq-10k": "10,000 Taskiq calls at once from one loop (default check_interval)",
    "arq": "arq 0.28 (own venv, redis-py 5): await (await enqueue_job('echo', x)).result(), arq's defaults "
    "(worker and result poll_delay 0.5 s; 20 calls per run)",
    "arq-fast": "the same with poll_delay 1 ms on the worker and on .result()",
    "arq-1k": "1,000 arq-fast calls at once from one loop (pool of 200 connections)",
    "arq-10k": "10,000 arq-fast calls at once from one loop (pool of 200 connections)",
    "streams-raw": "Streams floor: client XADD+BLPOP, server XREADGROUP BLOCK+LPUSH+XACK",
    "streams": "WebSocketRPCClient.call('echo') against an RPCServer process",
    "obs-base": ".call() baseline of the observability paths (same as call)",
    "call-otel-api": ".call() with setup_broker(tracing=True), OpenTelemetry API only (no SDK)",
    "call-otel-sdk": ".call() with tracing, the SDK and a batch exporter (caller and worker)",
    "call-metrics": ".call() with Prometheus metrics (caller and worker, Dramatiq's own middleware included)",
    "call-metrics-ours": ".call() with rpc-tasks' metrics only (caller and worker, no Dramatiq Prometheus)",
}

#: Observability paths and the most their p50 may be over ``obs-base``'s.
OBS_GOALS = {"call-otel-api": 1.03, "call-otel-sdk": 1.25, "call-metrics": 1.05, "call-metrics-ours": 1.05}


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
        for extra in ("enqueue_per_s", "drain_after_last_send_s", *aio_report.EXTRA_KEYS):
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
        "drain_after_last_send_s",
        "batch_p50_ms",
        "batch_p99_ms",
        *aio_report.EXTRA_KEYS,
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


#: Goal of ``send`` calls/s over ``dramatiq-send`` calls/s.
SEND_GOAL = 0.9
#: Paths measuring a Dramatiq configuration with many calls in flight (results collected).
DRAMATIQ_INFLIGHT_PATHS = ("inflight-dramatiq",)


def _measured(s: dict[str, Any] | None, key: str = "calls_per_s") -> bool:
    if not s or any(k in s for k in ("error", "na", "skipped")):
        return False
    value = s.get(key)
    return isinstance(value, (int, float)) and not math.isnan(value)


def comparisons(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The headline ratios of a run (only those whose paths were measured)."""
    out: dict[str, dict[str, Any]] = {}
    send, dsend = summaries.get("send"), summaries.get("dramatiq-send")
    if _measured(send) and _measured(dsend):
        assert send is not None and dsend is not None
        ratio = _ratio(send["calls_per_s"], dsend["calls_per_s"])
        out["send_vs_dramatiq_send"] = {
            "send_calls_per_s": send["calls_per_s"],
            "dramatiq_send_calls_per_s": dsend["calls_per_s"],
            "calls_per_s_ratio": ratio,
            "goal": SEND_GOAL,
            "goal_met": bool(ratio >= SEND_GOAL),
            "send_enqueue_per_s": send.get("enqueue_per_s"),
            "dramatiq_send_enqueue_per_s": dsend.get("enqueue_per_s"),
            "enqueue_per_s_ratio": _ratio(send.get("enqueue_per_s"), dsend.get("enqueue_per_s")),
            "send_enqueue_p50_ms": send.get("p50_ms"),
            "dramatiq_send_enqueue_p50_ms": dsend.get("p50_ms"),
            "enqueue_p50_ratio": _ratio(send.get("p50_ms"), dsend.get("p50_ms")),
        }
    psend = summaries.get("plain-send")
    if _measured(send) and _measured(psend):
        assert send is not None and psend is not None
        ratio = _ratio(send.get("enqueue_per_s"), psend.get("enqueue_per_s"))
        out["send_vs_plain_send_same_broker"] = {
            "send_enqueue_per_s": send.get("enqueue_per_s"),
            "plain_send_enqueue_per_s": psend.get("enqueue_per_s"),
            "enqueue_per_s_ratio": ratio,
            "goal": SEND_GOAL,
            "goal_met": bool(ratio >= SEND_GOAL),
            "calls_per_s_ratio": _ratio(send["calls_per_s"], psend["calls_per_s"]),
            "enqueue_p50_ratio": _ratio(send.get("p50_ms"), psend.get("p50_ms")),
        }
    inflight = summaries.get("inflight")
    if _measured(inflight):
        assert inflight is not None
        measured = {
            p: summaries[p]["calls_per_s"] for p in DRAMATIQ_INFLIGHT_PATHS if _measured(summaries.get(p))
        }
        entry: dict[str, Any] = {"inflight_calls_per_s": inflight["calls_per_s"]}
        if measured:
            best = max(measured, key=lambda p: measured[p])
            entry |= {
                "best_path": best,
                "best_calls_per_s": measured[best],
                "ratio": _ratio(inflight["calls_per_s"], measured[best]),
            }
        else:
            entry |= {"ratio": math.nan, "reason": "no Dramatiq in-flight path measured in this run"}
        out["inflight_vs_best_dramatiq_inflight"] = entry
    rabbit, raw = summaries.get("call-rabbitmq"), summaries.get("raw")
    if _measured(rabbit, "p50_ms") and _measured(raw, "p50_ms"):
        assert rabbit is not None and raw is not None
        call = summaries.get("call")
        out["call_rabbitmq_vs_raw"] = {
            "call_rabbitmq_p50_ms": rabbit["p50_ms"],
            "raw_p50_ms": raw["p50_ms"],
            "p50_ratio": _ratio(rabbit["p50_ms"], raw["p50_ms"]),
            "first_call_ratio": _ratio(rabbit.get("first_call_p50_ms"), raw.get("first_call_p50_ms")),
            "call_p50_ratio": _ratio(call.get("p50_ms"), raw["p50_ms"])
            if _measured(call, "p50_ms")
            else math.nan,
        }
    base = summaries.get("obs-base")
    if _measured(base, "p50_ms"):
        assert base is not None
        for name, goal in OBS_GOALS.items():
            s = summaries.get(name)
            if _measured(s, "p50_ms") and s is not None:
                ratio = _ratio(s["p50_ms"], base["p50_ms"])
                per_run = [
                    _ratio(a, b)
                    for a, b in zip(
                        [r["p50_ms"] for r in s["runs"]], [r["p50_ms"] for r in base["runs"]], strict=False
                    )
                ]
                # Runs are interleaved (run i of every path back to back): the median of the
                # per-run ratios pairs each run with the baseline's under the same conditions.
                paired = median([r for r in per_run if not math.isnan(r)]) if per_run else math.nan
                quartiles = _quartiles([r for r in per_run if not math.isnan(r)])
                out[f"{name}_vs_obs_base"] = {
                    "p50_ms": s["p50_ms"],
                    "base_p50_ms": base["p50_ms"],
                    "p50_ratio": ratio,
                    "p50_ratio_per_run": per_run,
                    "paired_ratio_median": paired,
                    "paired_ratio_quartiles": quartiles,
                    "goal": goal,
                    "goal_met": bool(paired <= goal),
                }
    scripts, call = summaries.get("scripts-floor"), summaries.get("call")
    if _measured(scripts, "p50_ms") and _measured(raw, "p50_ms"):
        assert scripts is not None and raw is not None
        out["call_vs_scripts_floor"] = {
            "scripts_floor_p50_ms": scripts["p50_ms"],
            "raw_p50_ms": raw["p50_ms"],
            "scripts_floor_vs_raw": _ratio(scripts["p50_ms"], raw["p50_ms"]),
            "call_p50_ms": call.get("p50_ms") if call else math.nan,
            "call_vs_scripts_floor": _ratio(call.get("p50_ms"), scripts["p50_ms"]) if call else math.nan,
            "call_minus_scripts_floor_ms": (call["p50_ms"] - scripts["p50_ms"])
            if _measured(call, "p50_ms") and call is not None
            else math.nan,
        }
    out |= aio_report.comparisons(summaries)
    return out


def comparison_lines(comp: dict[str, dict[str, Any]]) -> list[str]:
    """The headline ratios as text (printed under the table)."""
    lines = []
    c = comp.get("send_vs_dramatiq_send")
    if c:
        verdict = "met" if c["goal_met"] else "NOT met"
        throughput = (
            f"calls/s {c['send_calls_per_s']:.0f} / {c['dramatiq_send_calls_per_s']:.0f} = "
            f"{_f(c['calls_per_s_ratio'], '.2f')} (goal >= {c['goal']}: {verdict})"
        )
        enqueue_rate = (
            f"msgs/s {_f(c['send_enqueue_per_s'], '.0f')} / {_f(c['dramatiq_send_enqueue_per_s'], '.0f')} = "
            f"{_f(c['enqueue_per_s_ratio'], '.2f')}"
        )
        enqueue_p50 = (
            f"p50 {_f(c['send_enqueue_p50_ms'], '.3f')} / {_f(c['dramatiq_send_enqueue_p50_ms'], '.3f')} "
            f"ms = {_f(c['enqueue_p50_ratio'], '.2f')}x"
        )
        lines.append(f"send vs dramatiq-send: {throughput}; enqueue only: {enqueue_rate}, {enqueue_p50}")
    c = comp.get("send_vs_plain_send_same_broker")
    if c:
        verdict = "met" if c["goal_met"] else "NOT met"
        lines.append(
            f"send vs plain-send (same broker and worker): enqueue msgs/s "
            f"{_f(c['send_enqueue_per_s'], '.0f')} / {_f(c['plain_send_enqueue_per_s'], '.0f')} = "
            f"{_f(c['enqueue_per_s_ratio'], '.2f')} (goal >= {c['goal']}: {verdict}); "
            f"calls/s {_f(c['calls_per_s_ratio'], '.2f')}x; enqueue p50 {_f(c['enqueue_p50_ratio'], '.2f')}x"
        )
    c = comp.get("inflight_vs_best_dramatiq_inflight")
    if c:
        if "best_path" in c:
            lines.append(
                f"inflight vs best Dramatiq in-flight ({c['best_path']}): calls/s "
                f"{c['inflight_calls_per_s']:.0f} / {c['best_calls_per_s']:.0f} = {_f(c['ratio'], '.2f')}"
            )
        else:
            lines.append(f"inflight vs best Dramatiq in-flight: — ({c['reason']})")
    c = comp.get("call_rabbitmq_vs_raw")
    if c:
        call = _f(c["call_p50_ratio"], ".2f")
        lines.append(
            f"call-rabbitmq vs raw floor: p50 {c['call_rabbitmq_p50_ms']:.3f} / {c['raw_p50_ms']:.3f} ms = "
            f"{_f(c['p50_ratio'], '.2f')}x{'' if call == '—' else f' (call: {call}x)'}; first call after "
            f"idle {_f(c['first_call_ratio'], '.1f')}x"
        )
    c = comp.get("call_vs_scripts_floor")
    if c:
        lines.append(
            f"scripts-floor (Dramatiq's scripts, no worker) vs raw floor: p50 "
            f"{c['scripts_floor_p50_ms']:.3f} / {c['raw_p50_ms']:.3f} ms = "
            f"{_f(c['scripts_floor_vs_raw'], '.2f')}x; call vs scripts-floor: "
            f"{_f(c['call_vs_scripts_floor'], '.2f')}x (+{_f(c['call_minus_scripts_floor_ms'], '.3f')} ms: "
            f"Dramatiq's worker, middleware and validation)"
        )
    lines += aio_report.lines(comp)
    for name in OBS_GOALS:
        c = comp.get(f"{name}_vs_obs_base")
        if c:
            q1, q3 = c["paired_ratio_quartiles"]
            lines.append(
                f"{name} vs obs-base: p50 {c['p50_ms']:.3f} / {c['base_p50_ms']:.3f} ms = "
                f"{_f(c['p50_ratio'], '.3f')}x; median of {len(c['p50_ratio_per_run'])} paired runs "
                f"{_f(c['paired_ratio_median'], '.3f')}x (quartiles {_f(q1, '.3f')}-{_f(q3, '.3f')}; "
                f"goal <= {c['goal']}: {'met' if c['goal_met'] else 'NOT met'})"
            )
    return ["Ratios:", *(f"  {line}" for line in lines)] if lines else []


def _quartiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return percentile(values, 25), percentile(values, 75)


def _ratio(a: Any, b: Any) -> float:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or math.isnan(b):
        return math.nan
    return float(a) / float(b)


def _f(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "—"
    return format(value, fmt)


COLUMNS = (
    ("path", 17, "<"),
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
            lines.append(f"{name:<{COLUMNS[0][1]}}  {str(reason)[:110]}")
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
            if name in ("send", "plain-send", "dramatiq-send"):
                label, style = f"{name}, enqueue only (p50 {s['p50_ms']:.2f} ms)", "--"
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
