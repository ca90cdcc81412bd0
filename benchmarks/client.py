"""Client side of the benchmark: measures the paths of one worker group and writes JSON.

    python -m benchmarks.client --paths call,send,inflight --calls 2000 --runs 3 --out x.json

Started by ``benchmarks.run`` in its own process (after the group's worker process is up), so
that each group's imports and global state (Dramatiq's global broker and encoder, Celery's app)
stay apart. For each path: wait until the worker answers and warm up; then ``--runs`` timed runs
of ``--calls`` calls (``INFO commandstats`` read before and after each run), interleaved across
the group's paths (run 1 of each, run 2 of each, ...); then ``--first-samples`` single calls
each after ``--idle-gap`` seconds of silence.

The arq groups' client runs this module with ``.venv-arq``'s python (redis-py 5, no rpc_tasks;
see :mod:`benchmarks.arq_env`): keep its module-level imports to the standard library, redis
and :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from typing import Any

import redis

from benchmarks.common import MESSAGE, commands_delta, commandstats, names, progress, redis_url

#: Seconds a single timed call may take before the path is reported as failed.
CALL_TIMEOUT = 10.0


class Path:
    """One measured path. ``one()`` is a single round trip; ``run(n)`` a timed run."""

    name = ""
    #: Whether "first call after idle" is measured for this path.
    first_call = True
    #: At most this many calls per warm-up and per timed run (for paths of ~0.5 s a call).
    max_calls: int | None = None

    def calls(self, n: int) -> int:
        """The calls of a warm-up or timed run of ``n`` calls for this path."""
        return n if self.max_calls is None else min(n, self.max_calls)

    def setup(self) -> None:
        pass

    def probe(self) -> None:
        """One call with a short timeout; raises while the worker is not answering yet."""
        self.one()

    def one(self) -> None:
        raise NotImplementedError

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        latencies: list[float] = []
        one = self.one
        clock = time.perf_counter
        started = clock()
        for _ in range(n):
            t0 = clock()
            one()
            latencies.append((clock() - t0) * 1000.0)
            bar.update(1)
        elapsed = clock() - started
        return {"calls": n, "elapsed_s": elapsed, "latencies_ms": latencies}

    def na_reason(self) -> str | None:
        """Why the path cannot be measured (then it is reported as ``n/a``)."""
        return None

    def close(self) -> None:
        pass


# -- floors -----------------------------------------------------------------------------------


class RawPath(Path):
    """Client ``LPUSH`` + ``BLPOP`` against ``workers/raw_echo.py`` (``BLPOP`` + ``LPUSH``)."""

    name = "raw"

    def setup(self) -> None:
        self.r = redis.Redis.from_url(redis_url())
        self.n = names()

    def _call(self, timeout: float) -> None:
        key = self.n.raw_reply_prefix + uuid.uuid4().hex
        payload = json.dumps({"reply_to": key, "message": MESSAGE})
        self.r.lpush(self.n.raw_requests, payload)
        if self.r.blpop([key], timeout=timeout) is None:
            raise TimeoutError("no reply from raw_echo")

    def probe(self) -> None:
        self._call(1)

    def one(self) -> None:
        self._call(CALL_TIMEOUT)

    def close(self) -> None:
        self.r.close()


class StreamsRawPath(RawPath):
    """Client ``XADD`` + ``BLPOP`` against ``workers/streams_raw.py`` (``XREADGROUP BLOCK`` +
    ``LPUSH`` + ``XACK``)."""

    name = "streams-raw"

    def _call(self, timeout: float) -> None:
        key = self.n.xraw_reply_prefix + uuid.uuid4().hex
        payload = json.dumps({"reply_to": key, "message": MESSAGE})
        self.r.xadd(self.n.xraw_stream, {"payload": payload}, maxlen=10000, approximate=True)
        if self.r.blpop([key], timeout=timeout) is None:
            raise TimeoutError("no reply from streams_raw")


class ScriptsFloorPath(RawPath):
    """The round trips of a ``.call()`` on ``BlockingRedisBroker`` with Dramatiq's own scripts
    and message JSON, but no Dramatiq (worker, middleware) or rpc-tasks (validation) code:
    ``EVALSHA`` enqueue + ``BLPOP`` + ``DEL`` in one write, against
    ``workers/scripts_echo.py``."""

    name = "scripts-floor"

    def setup(self) -> None:
        from benchmarks.workers import scripts_echo
        from rpc_tasks.redis.connection import pipelined

        self.n = names()
        self.b = scripts_echo.broker()
        self.queue = self.n.queue(scripts_echo.KIND)
        self.pipelined = pipelined
        script = self.b.scripts["dispatch_rpc"]
        script(keys=[self.b.namespace], args=self.b._dispatch_args("fetch", self.queue, 0))  # load it
        self.sha = script.sha

    def _call(self, timeout: float) -> None:
        key = self.n.raw_reply_prefix + uuid.uuid4().hex
        rid = str(uuid.uuid4())
        message = {
            "queue_name": self.queue,
            "actor_name": "echo",
            "args": [{"message": MESSAGE}],
            "kwargs": {},
            "options": {"redis_message_id": rid, "reply_to": key},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
        data = json.dumps(message, separators=(",", ":")).encode()
        enqueue = ("EVALSHA", self.sha, 1, self.b.namespace, *self.b._enqueue_args(self.queue, rid, data))
        replies = self.pipelined(self.b.client, [enqueue, ("BLPOP", key, timeout), ("DEL", key)])
        if replies[1] is None:
            raise TimeoutError("no reply from scripts_echo")

    def close(self) -> None:
        self.b.close()


# -- rpc-tasks --------------------------------------------------------------------------------

_built: dict[str, Any] = {}


def _build(kind: str) -> tuple[Any, Any, str]:
    if kind not in _built:
        from benchmarks.workers.dramatiq_app import build

        _built[kind] = build(kind)
    return _built[kind]


class CallPath(Path):
    """``@rpc_actor`` ``.call()``; ``kind`` picks the broker (see ``workers/dramatiq_app.py``)."""

    kind = "blocking"
    name = "call"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import EchoParams

        self.broker, self.actor, self.queue = _build(self.kind)
        self.params = EchoParams(message=MESSAGE)

    def probe(self) -> None:
        self.actor.call(self.params, timeout=1.0)

    def one(self) -> None:
        result = self.actor.call(self.params, timeout=CALL_TIMEOUT)
        if result.message != MESSAGE:
            raise AssertionError(f"bad echo {result!r}")


class CallPlainPath(CallPath):
    kind = "plain"
    name = "call-plain"


class CallRabbitmqPath(CallPath):
    """Same ``@rpc_actor`` and config, Dramatiq's ``RabbitmqBroker`` (replies still over Redis)."""

    kind = "rabbitmq"
    name = "call-rabbitmq"

    def close(self) -> None:
        self.broker.close()


class SendPath(CallPath):
    """``.send()`` N messages (each ``.send()`` timed: the enqueue round trip), then
    ``broker.join(queue)`` until the worker has processed (acked) them all."""

    name = "send"
    first_call = False

    def probe(self) -> None:
        super().probe()
        self.broker.join(self.queue, interval=5, timeout=30_000)

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return send_and_join(self, n, bar)


class PlainSendPath(SendPath):
    """A plain ``@dramatiq.actor``'s ``.send(x)`` on the *same* broker and worker as ``send``
    (no params model, no validation), measured exactly like ``send``."""

    name = "plain-send"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import plain_actor

        super().setup()
        self.actor = plain_actor(self.broker)
        self.params = MESSAGE

    def probe(self) -> None:
        self.actor.send(self.params)
        self.broker.join(self.queue, interval=5, timeout=30_000)


def send_and_join(path: Any, n: int, bar: Any) -> dict[str, Any]:
    """The ``send`` measurement, shared with ``dramatiq-send``: ``path.actor.send(path.params)``
    ``n`` times (each timed), then ``path.broker.join(path.queue)`` until all were processed."""
    path.broker.join(path.queue, interval=5, timeout=30_000)
    latencies: list[float] = []
    send = path.actor.send
    params = path.params
    clock = time.perf_counter
    started = clock()
    for _ in range(n):
        t0 = clock()
        send(params)
        latencies.append((clock() - t0) * 1000.0)
        bar.update(1)
    sent = clock()
    path.broker.join(path.queue, interval=5, timeout=120_000)
    done = clock()
    return {
        "calls": n,
        "elapsed_s": done - started,
        "latencies_ms": latencies,
        "enqueue_per_s": n / (sent - started),
        "drain_after_last_send_s": done - sent,
    }


class InflightPath(CallPath):
    """``.call_many()``: ``--batch`` calls in flight from one thread, results collected."""

    name = "inflight"
    first_call = False
    batch = 100

    def na_reason(self) -> str | None:
        self.setup()
        if not callable(getattr(self.actor, "call_many", None)):
            return "n/a (no call_many yet)"
        return None

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        batches: list[float] = []
        clock = time.perf_counter
        started = clock()
        left = n
        while left > 0:
            size = min(self.batch, left)
            t0 = clock()
            results = self.actor.call_many([self.params] * size, timeout=30.0)
            batches.append((clock() - t0) * 1000.0)
            if len(results) != size or any(r.message != MESSAGE for r in results):
                raise AssertionError("call_many returned wrong results")
            left -= size
            bar.update(size)
        return {"calls": n, "elapsed_s": clock() - started, "latencies_ms": [], "batch_ms": batches}


# -- other libraries --------------------------------------------------------------------------


class DramatiqResultsPath(Path):
    """Dramatiq's own: ``actor.send(x).get_result(block=True)`` with the Redis result backend."""

    name = "dramatiq-results"

    def setup(self) -> None:
        import dramatiq

        self.broker, self.actor, self.queue = _build("results")
        dramatiq.set_broker(self.broker)  # get_result() finds the backend on the global broker

    def probe(self) -> None:
        self.actor.send(MESSAGE).get_result(block=True, timeout=1000)

    def one(self) -> None:
        if self.actor.send(MESSAGE).get_result(block=True) != MESSAGE:  # Dramatiq's defaults
            raise AssertionError("bad echo")


class InflightDramatiqPath(DramatiqResultsPath):
    """Dramatiq's own in flight: ``--batch`` ``actor.send(x)``, then ``get_result(block=True)``
    of each (Dramatiq's defaults), repeated; on the ``dramatiq-results`` worker."""

    name = "inflight-dramatiq"
    first_call = False
    batch = 100

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        batches: list[float] = []
        send = self.actor.send
        clock = time.perf_counter
        started = clock()
        left = n
        while left > 0:
            size = min(self.batch, left)
            t0 = clock()
            messages = [send(MESSAGE) for _ in range(size)]
            results = [m.get_result(block=True) for m in messages]
            batches.append((clock() - t0) * 1000.0)
            if any(r != MESSAGE for r in results):
                raise AssertionError("get_result returned wrong results")
            left -= size
            bar.update(size)
        return {"calls": n, "elapsed_s": clock() - started, "latencies_ms": [], "batch_ms": batches}


class DramatiqSendPath(Path):
    """Dramatiq's own ``actor.send(x)`` (plain ``@dramatiq.actor``, ``RedisBroker``, no
    rpc-tasks code), measured exactly like ``send``."""

    name = "dramatiq-send"
    first_call = False

    def setup(self) -> None:
        self.broker, self.actor, self.queue = _build("dramatiq")
        self.params = MESSAGE

    def probe(self) -> None:
        self.actor.send(self.params)
        # The polling consumer may sleep up to its 1 s back-off before it fetches.
        self.broker.join(self.queue, interval=5, timeout=3_000)

    def one(self) -> None:
        self.actor.send(self.params)

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        return send_and_join(self, n, bar)


class CeleryPath(Path):
    """Celery 5: ``echo.delay(x).get()`` with Redis broker and result backend."""

    name = "celery"

    def setup(self) -> None:
        from benchmarks.workers.celery_app import echo

        self.echo = echo

    def probe(self) -> None:
        self.echo.delay(MESSAGE).get(timeout=1)

    def one(self) -> None:
        if self.echo.delay(MESSAGE).get(timeout=CALL_TIMEOUT) != MESSAGE:
            raise AssertionError("bad echo")


class StreamsPath(Path):
    """``WebSocketRPCClient.call("echo", ...)`` against an ``RPCServer`` process."""

    name = "streams"

    def setup(self) -> None:
        from benchmarks.workers.streams_app import config
        from rpc_tasks import EchoParams, EchoResult, WebSocketRPCClient

        self.client = WebSocketRPCClient(config())
        self.params = EchoParams(message=MESSAGE)
        self.result_model = EchoResult

    def probe(self) -> None:
        self.client.call("echo", self.params, self.result_model, timeout=1.0)

    def one(self) -> None:
        result = self.client.call("echo", self.params, self.result_model, timeout=CALL_TIMEOUT)
        if result.message != MESSAGE:
            raise AssertionError("bad echo")

    def close(self) -> None:
        self.client.close()


class ObsBasePath(CallPath):
    """``.call()`` without tracing or metrics: the baseline of the observability paths."""

    name = "obs-base"
    first_call = False


class ObsPath(CallPath):
    """``.call()`` with tracing or metrics turned on around each of its runs only (the client
    process measures the baseline too)."""

    first_call = False

    def enable(self) -> None:
        raise NotImplementedError

    def disable(self) -> None:
        raise NotImplementedError

    def run(self, n: int, bar: Any) -> dict[str, Any]:
        self.enable()
        try:
            return super().run(n, bar)
        finally:
            self.disable()


class OtelApiPath(ObsPath):
    """``setup_broker(tracing=True)`` on both sides, OpenTelemetry API only (no SDK provider)."""

    kind = "otel-api"
    name = "call-otel-api"

    def enable(self) -> None:
        from rpc_tasks.observability import enable_tracing

        enable_tracing()

    def disable(self) -> None:
        from rpc_tasks.observability import disable_tracing

        disable_tracing()


class OtelSdkPath(OtelApiPath):
    """Tracing with the SDK and a batch exporter on both sides (spans serialized to /dev/null)."""

    kind = "otel-sdk"
    name = "call-otel-sdk"

    def setup(self) -> None:
        from benchmarks.workers.dramatiq_app import sdk_provider

        super().setup()
        self.provider = sdk_provider()

    def enable(self) -> None:
        from rpc_tasks.observability import enable_tracing

        enable_tracing(tracer_provider=self.provider)

    def close(self) -> None:
        self.provider.shutdown()


class MetricsPath(ObsPath):
    """Prometheus metrics on both sides (the worker: ``setup_broker(metrics=True)``, which
    includes Dramatiq's own ``Prometheus`` middleware)."""

    kind = "metrics"
    name = "call-metrics"

    def enable(self) -> None:
        from rpc_tasks.observability import enable_metrics

        enable_metrics()

    def disable(self) -> None:
        from rpc_tasks.observability import disable_metrics

        disable_metrics()


class MetricsOursPath(MetricsPath):
    """rpc-tasks' metrics only: the worker has ``RPCMetricsMiddleware`` without Dramatiq's
    ``Prometheus`` middleware (``install_metrics(broker, dramatiq_prometheus=False)``)."""

    kind = "metrics-ours"
    name = "call-metrics-ours"


PATHS: dict[str, type[Path]] = {
    cls.name: cls
    for cls in (
        RawPath,
        ScriptsFloorPath,
        CallPath,
        CallPlainPath,
        CallRabbitmqPath,
        SendPath,
        PlainSendPath,
        DramatiqSendPath,
        InflightPath,
        DramatiqResultsPath,
        InflightDramatiqPath,
        CeleryPath,
        StreamsRawPath,
        StreamsPath,
        ObsBasePath,
        OtelApiPath,
        OtelSdkPath,
        MetricsPath,
        MetricsOursPath,
    )
}


def wait_ready(path: Path, seconds: float) -> float:
    """Probe until the worker answers; returns the seconds it took."""
    started = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - started < seconds:
        try:
            path.probe()
            return time.monotonic() - started
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"worker for {path.name!r} did not answer within {seconds:.0f}s: {last!r}")


def prepare(path: Path, args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """Set a path up, wait for its worker and warm it up; its result record."""
    out: dict[str, Any] = {"path": path.name, "runs": [], "first_call_ms": []}
    reason = path.na_reason()
    if reason:
        out["na"] = reason
        bar.update(planned_calls(path, args))
        return out
    path.setup()
    bar.set_description(f"{path.name} (waiting)", refresh=False)
    out["ready_s"] = wait_ready(path, args.ready_timeout)
    bar.set_description(f"{path.name} warm-up", refresh=False)
    path.run(path.calls(args.warmup), bar)
    return out


def timed_run(
    path: Path, args: argparse.Namespace, bar: Any, r: redis.Redis, i: int, out: dict[str, Any]
) -> None:
    bar.set_description(f"{path.name} run {i + 1}/{args.runs}", refresh=False)
    gc.collect()
    before = commandstats(r)
    run = path.run(path.calls(args.calls), bar)
    after = commandstats(r)
    run["commands"] = commands_delta(before, after)
    out["runs"].append(run)


def first_calls(path: Path, args: argparse.Namespace, bar: Any, out: dict[str, Any]) -> None:
    if not path.first_call:
        bar.update(args.first_samples)
        return
    bar.set_description(f"{path.name} after idle", refresh=False)
    for _ in range(args.first_samples):
        time.sleep(args.idle_gap)
        t0 = time.perf_counter()
        path.one()
        out["first_call_ms"].append((time.perf_counter() - t0) * 1000.0)
        bar.update(1)


def measure_group(names: list[str], args: argparse.Namespace, bar: Any, r: redis.Redis) -> dict[str, Any]:
    """Measure the paths of one worker group with their timed runs *interleaved* (run 1 of
    every path, then run 2, ...), so that paths compared with each other (``send`` and
    ``plain-send``) see the same machine conditions."""
    results: dict[str, Any] = {}
    live: dict[str, Path] = {}

    def fail(name: str, exc: Exception) -> None:
        traceback.print_exc()
        results[name] = {"path": name, "error": f"{type(exc).__name__}: {exc}"}
        path = live.pop(name, None)
        if path is not None:
            try:
                path.close()
            except Exception:
                pass

    for name in names:
        path = live[name] = PATHS[name]()
        try:
            results[name] = prepare(path, args, bar)
            if "na" in results[name]:
                live.pop(name).close()
        except Exception as exc:
            fail(name, exc)
    for i in range(args.runs):
        # Each round starts with the next path, so no path always runs first (or last).
        shift = i % max(1, len(live))
        order = list(live)
        for name in order[shift:] + order[:shift]:
            if name not in live:  # failed earlier in this round
                continue
            try:
                timed_run(live[name], args, bar, r, i, results[name])
            except Exception as exc:
                fail(name, exc)
    for name in list(live):
        try:
            first_calls(live[name], args, bar, results[name])
        except Exception as exc:
            fail(name, exc)
    for path in live.values():
        try:
            path.close()
        except Exception:
            pass
    return results


def planned_calls(path: Path, args: argparse.Namespace) -> int:
    """Calls the progress bar counts for one path (bursts count more: they report their own)."""
    return path.calls(args.warmup) + args.runs * path.calls(args.calls) + args.first_samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paths", required=True, help="comma-separated: " + ",".join(PATHS))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--first-samples", type=int, default=5)
    parser.add_argument("--idle-gap", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10_000, help="acalls at once in acall-10k")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard limit of this process")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # Bounded in time whatever happens (a hung Redis call, a worker that never answers).
    timer = threading.Timer(args.max_seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    InflightPath.batch = InflightDramatiqPath.batch = args.batch
    from benchmarks import aio_paths, arq_paths  # the async paths (they subclass CallPath)

    PATHS.update(aio_paths.PATHS)
    PATHS.update(arq_paths.PATHS)
    aio_paths.Acall10kPath.concurrency = args.concurrency

    selected = [p for p in args.paths.split(",") if p]
    r = redis.Redis.from_url(redis_url())
    results: dict[str, Any] = {}
    total = sum(planned_calls(PATHS[p](), args) for p in selected if p in PATHS)
    bar = progress(total, selected[0] if selected else "")
    try:
        results = measure_group(selected, args, bar, r)
    finally:
        bar.close()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # stopped by the runner (SIGTERM) or Ctrl-C
        sys.exit(130)
