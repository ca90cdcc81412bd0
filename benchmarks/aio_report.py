"""Headline figures of the async paths (see :mod:`benchmarks.aio_paths`): ``acall`` p50 over
``call`` p50 (goal <= 1.15x), ``acall-10k`` calls/s over ``inflight`` (the sync ``call_many``;
goal >= 1), the caller's Redis connections (goal <= 4), RSS growth (goal < 20 MB) and the
event loop's lag with 1,000 calls in flight (goal < 5 ms)."""

from __future__ import annotations

import math
from typing import Any

ACALL_P50_GOAL = 1.15
MAX_CONNECTIONS = 4
MAX_RSS_GROWTH_MB = 20.0
MAX_LAG_MS = 5.0
#: Other libraries' async paths: one call at a time (``acall``'s p50 against the best of them)
#: and many at once from one loop (``acall-10k``'s calls/s against each).
SEQUENTIAL_PEERS = ("taskiq", "taskiq-fast", "arq", "arq-fast")
BURST_PEERS = ("taskiq-1k", "taskiq-10k", "arq-1k", "arq-10k")

#: Per-run figures of the async paths, reported as medians over runs.
EXTRA_KEYS = (
    "peak_redis_connections",
    "client_cpu_us_per_call",
    "rss_growth_mb",
    "rss_run_growth_mb",
    "loop_lag_p50_ms",
    "loop_lag_p99_ms",
    "loop_lag_max_ms",
    "loop_work_p99_ms",
    "loop_work_max_ms",
    "idle_loop_lag_p99_ms",
)


def _ok(summary: dict[str, Any] | None, key: str) -> bool:
    if not summary or any(k in summary for k in ("error", "na", "skipped")):
        return False
    value = summary.get(key)
    return isinstance(value, (int, float)) and not math.isnan(value)


def comparisons(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    acall, call = summaries.get("acall"), summaries.get("call")
    if _ok(acall, "p50_ms") and _ok(call, "p50_ms"):
        assert acall is not None and call is not None
        ratio = acall["p50_ms"] / call["p50_ms"]
        out["acall_vs_call"] = {
            "acall_p50_ms": acall["p50_ms"],
            "call_p50_ms": call["p50_ms"],
            "ratio": ratio,
            "goal": ACALL_P50_GOAL,
            "goal_met": ratio <= ACALL_P50_GOAL,
        }
    many, inflight = summaries.get("acall-10k"), summaries.get("inflight")
    if _ok(many, "calls_per_s"):
        assert many is not None
        entry: dict[str, Any] = {
            "calls_per_s": many["calls_per_s"],
            "peak_redis_connections": many.get("peak_redis_connections"),
            "client_cpu_us_per_call": many.get("client_cpu_us_per_call"),
            "rss_growth_mb": many.get("rss_growth_mb"),
            "loop_lag_p99_ms": many.get("loop_lag_p99_ms"),
        }
        if _ok(inflight, "calls_per_s"):
            assert inflight is not None
            entry["inflight_calls_per_s"] = inflight["calls_per_s"]
            entry["ratio_to_inflight"] = many["calls_per_s"] / inflight["calls_per_s"]
        out["acall_10k"] = entry
    peers = {p: summaries[p] for p in SEQUENTIAL_PEERS if _ok(summaries.get(p), "p50_ms")}
    if _ok(acall, "p50_ms") and peers:
        assert acall is not None
        best = min(peers, key=lambda p: peers[p]["p50_ms"])
        ratio = acall["p50_ms"] / peers[best]["p50_ms"]
        out["acall_vs_async_peers"] = {
            "acall_p50_ms": acall["p50_ms"],
            "peers_p50_ms": {p: peers[p]["p50_ms"] for p in peers},
            "best_peer": best,
            "ratio_to_best": ratio,
            "goal": 1 / 3,
            "goal_met": ratio <= 1 / 3,
        }
    for peer in BURST_PEERS:
        peer_many = summaries.get(peer)
        if not _ok(many, "calls_per_s") or not peer_many:
            continue
        assert many is not None
        entry = {"peer": peer, "acall_calls_per_s": many["calls_per_s"]}
        if _ok(peer_many, "calls_per_s"):
            entry |= {
                "peer_calls_per_s": peer_many["calls_per_s"],
                "peer_peak_redis_connections": peer_many.get("peak_redis_connections"),
                "ratio": many["calls_per_s"] / peer_many["calls_per_s"],
            }
        else:
            entry["peer_error"] = str(peer_many.get("error") or peer_many.get("skipped") or "not measured")
        out[f"acall_10k_vs_{peer.replace('-', '_')}"] = entry
    lag = summaries.get("acall-1k")
    if _ok(lag, "loop_lag_p99_ms"):
        assert lag is not None
        out["acall_1k_loop_lag"] = {
            "calls_per_s": lag.get("calls_per_s"),
            "loop_lag_p50_ms": lag.get("loop_lag_p50_ms"),
            "loop_lag_p99_ms": lag["loop_lag_p99_ms"],
            "loop_lag_max_ms": lag.get("loop_lag_max_ms"),
            "loop_work_p99_ms": lag.get("loop_work_p99_ms"),
            "loop_work_max_ms": lag.get("loop_work_max_ms"),
            "idle_loop_lag_p99_ms": lag.get("idle_loop_lag_p99_ms"),
            "goal_ms": MAX_LAG_MS,
        }
    return out


def _f(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "—"
    return format(value, fmt)


def lines(comp: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    c = comp.get("acall_vs_call")
    if c:
        verdict = "met" if c["goal_met"] else "NOT met"
        out.append(
            f"acall vs call: p50 {c['acall_p50_ms']:.3f} / {c['call_p50_ms']:.3f} ms = {c['ratio']:.2f}x "
            f"(goal <= {c['goal']}: {verdict})"
        )
    c = comp.get("acall_10k")
    if c:
        versus = (
            f" = {_f(c['ratio_to_inflight'], '.2f')}x inflight ({_f(c['inflight_calls_per_s'], '.0f')})"
            if "ratio_to_inflight" in c
            else ""
        )
        out.append(
            f"acall-10k: {c['calls_per_s']:.0f} calls/s{versus}; caller Redis connections "
            f"{_f(c['peak_redis_connections'], '.0f')} (goal <= {MAX_CONNECTIONS}); caller CPU "
            f"{_f(c['client_cpu_us_per_call'], '.0f')} us/call; RSS growth "
            f"{_f(c['rss_growth_mb'], '.1f')} MB (goal < {MAX_RSS_GROWTH_MB:.0f}); loop lag p99 "
            f"{_f(c['loop_lag_p99_ms'], '.1f')} ms"
        )
    c = comp.get("acall_vs_async_peers")
    if c:
        peers = ", ".join(f"{p} {v:.3f} ms" for p, v in c["peers_p50_ms"].items())
        verdict = "met" if c["goal_met"] else "NOT met"
        out.append(
            f"acall vs async peers: p50 {c['acall_p50_ms']:.3f} ms vs {peers}: "
            f"{c['ratio_to_best']:.2f}x the best (goal <= 0.33: {verdict})"
        )
    for peer in BURST_PEERS:
        c = comp.get(f"acall_10k_vs_{peer.replace('-', '_')}")
        if c and "ratio" in c:
            out.append(
                f"acall-10k vs {c['peer']}: {c['acall_calls_per_s']:.0f} / {c['peer_calls_per_s']:.0f} "
                f"calls/s = {c['ratio']:.2f}x ({c['peer']}'s connections: "
                f"{_f(c['peer_peak_redis_connections'], '.0f')})"
            )
        elif c:
            out.append(f"acall-10k ({c['acall_calls_per_s']:.0f} calls/s) vs {c['peer']}: {c['peer_error']}")
    c = comp.get("acall_1k_loop_lag")
    if c:
        out.append(
            f"acall-1k (1,000 in flight): {_f(c['calls_per_s'], '.0f')} calls/s; loop lag p50 "
            f"{_f(c['loop_lag_p50_ms'], '.2f')} / p99 {_f(c['loop_lag_p99_ms'], '.2f')} / max "
            f"{_f(c['loop_lag_max_ms'], '.2f')} ms (goal < {MAX_LAG_MS:.0f} ms; an idle loop's p99 here: "
            f"{_f(c['idle_loop_lag_p99_ms'], '.2f')} ms); the loop's own work before the probe: p99 "
            f"{_f(c['loop_work_p99_ms'], '.2f')} / max {_f(c['loop_work_max_ms'], '.2f')} ms CPU"
        )
    return out
