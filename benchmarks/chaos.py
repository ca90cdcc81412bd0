"""Fault suite: real ``dramatiq`` workers and ``rpc-tasks serve`` servers on a private Redis,
faults injected, one table of what happened to every message and caller.

    python -m benchmarks.chaos [--seed 7] [--fuzz 2000]      (or: make chaos)

Not a timed test: it counts. Loopback only, a private ``redis-server`` (AOF on,
``appendfsync always``) on a free port, every process bounded in time; the whole run takes
about four minutes. Scenarios:

* ``sigkill-workers``: two worker processes under load (``.call()`` and ``.send()`` of a plain
  and an idempotent actor); three times, one worker is SIGKILLed and a new one started;
* ``redis-restart``: the same load; Redis is SIGKILLed and restarted 3 s later (AOF);
* ``sigkill-rpcserver``: two ``RPCServer`` processes (Streams) under load; one is SIGKILLed;
* ``fuzz-queue`` / ``fuzz-stream``: seeded random malformed messages pushed straight into
  Dramatiq's Redis structures / the request stream, in batches, a normal call after each batch.

Columns: messages sent; completed runs once / twice; lost (never completed, or for fuzz rows:
neither run nor dead-lettered); callers answered / timed out / errored / answered wrongly
(``.send()`` counts as answered when the enqueue returned); recovery: the longest time from a
fault until every call that was in flight at it was answered (Redis restart: from Redis being
back to the next answer; fuzz: the slowest follow-up call).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.procs import Worker

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A private redis-server with AOF (``appendfsync always``), restartable on its port/dir."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="rpc-tasks-chaos-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port).ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    once: int = 0
    twice: int = 0
    lost: int = 0
    answered: int = 0
    timed_out: int = 0
    errored: int = 0
    wrong: int = 0
    recovery: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Call:
    id: str
    kind: str  # plain | idem | streams
    mode: str  # call | send
    start: float
    end: float = 0.0
    outcome: str = ""  # answered | timed_out | errored | wrong


class Suite:
    def __init__(self, seed: int, fuzz: int) -> None:
        self.seed = seed
        self.fuzz = fuzz
        self.redis = Server()
        self.tag = "chaos"
        self.logs = tempfile.mkdtemp(prefix="rpc-tasks-chaos-logs-")
        self.procs: list[Worker] = []
        self.rows: list[Row] = []
        self.only: list[str] = []

    # -- processes ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CHAOS_REDIS_URL=self.redis.url,
            CHAOS_TAG=self.tag,
            PYTHONPATH=str(ROOT),
            dramatiq_restart_delay="3000",
        )
        return env

    def worker(self, name: str) -> Worker:
        cmd = [
            sys.executable,
            "-m",
            "dramatiq",
            "benchmarks.workers.chaos_app",
            "--processes",
            "1",
            "--threads",
            "4",
        ]
        return self.spawn(name, cmd)

    def rpc_server(self, name: str) -> Worker:
        cmd = [
            sys.executable,
            "-m",
            "rpc_tasks.cli",
            "serve",
            "--app",
            "benchmarks.workers.chaos_app:make_server",
            "--consumer-name",
            name,
        ]
        return self.spawn(name, cmd)

    def spawn(self, name: str, cmd: list[str]) -> Worker:
        """Start ``cmd`` as process ``name`` (its log in the run's log folder), tracked for
        :meth:`stop_all`."""
        proc = Worker(
            name, cmd, env=self.env(), cwd=str(ROOT), log_path=f"{self.logs}/{name}.log", lifetime=600
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: Worker) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(5)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop(grace=5)
        self.procs = []

    # -- load -----------------------------------------------------------------------------------

    def load(
        self, seconds: float, kinds: list[str], faults: list[tuple[float, Any]], threads: int = 6
    ) -> list[Call]:
        app = self.app
        calls: list[Call] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds
        rng = random.Random(self.seed)

        def one(caller: int) -> None:
            client = app.streams_client() if "streams" in kinds else None
            local = random.Random(rng.random() + caller)
            while time.monotonic() < stop:
                kind = local.choice(kinds)
                mode = "send" if kind != "streams" and local.random() < 0.3 else "call"
                job = app.Job(id=uuid.uuid4().hex, work_ms=local.choice((5, 20, 80)))
                call = Call(job.id, kind, mode, time.monotonic())
                with lock:
                    calls.append(call)
                try:
                    if kind == "streams":
                        got = client.call("chaos_echo", job, app.Done, timeout=30)
                    elif mode == "send":
                        app.actor(kind).send(job)
                        got = app.Done(id=job.id)
                    else:
                        got = app.actor(kind).call(job, timeout=30)
                    call.outcome = "answered" if got.id == job.id else "wrong"
                except app.RPCTimeoutError:
                    call.outcome = "timed_out"
                except Exception:
                    call.outcome = "errored"
                    time.sleep(0.05)
                call.end = time.monotonic()

        workers = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(threads)]
        started = time.monotonic()
        for thread in workers:
            thread.start()
        for at, fault in faults:
            time.sleep(max(0.0, started + at - time.monotonic()))
            fault()
        for thread in workers:
            thread.join(seconds + 60)
        return calls

    def settle(self, calls: list[Call], kinds: list[str], limit: float = 60.0) -> dict[str, int]:
        """Wait until every job ran (or ``limit``); completed-run counts per job id."""
        client = redis.Redis.from_url(self.redis.url)
        ids = {c.id for c in calls}
        deadline = time.monotonic() + limit
        counts: dict[str, int] = {}
        while True:
            counts = {}
            for kind in kinds:
                for key, value in client.hgetall(f"{self.tag}:exec:{kind}").items():
                    if key.decode() in ids:
                        counts[key.decode()] = counts.get(key.decode(), 0) + int(value)
            if len(counts) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # a straggling duplicate
        client.close()
        return counts

    def row(self, name: str, calls: list[Call], counts: dict[str, int], fault_times: list[float]) -> Row:
        row = Row(name, sent=len(calls))
        refused = expired = 0
        for call in calls:
            n = counts.get(call.id, 0)
            outcome = call.outcome or "errored"
            row.once += n == 1
            row.twice += n >= 2
            if n == 0 and outcome == "errored":
                refused += 1  # the caller was told it failed (e.g. Redis down): not lost
            elif n == 0 and outcome == "timed_out" and call.mode == "call":
                expired += 1  # the caller gave up; its message is skipped as expired by design
            else:
                row.lost += n == 0
            setattr(row, outcome, getattr(row, outcome) + 1)
        if refused:
            row.notes.append(f"refused with an error, never ran: {refused}")
        if expired:
            row.notes.append(f"timed out, then skipped as expired: {expired}")
        recoveries = []
        for at in fault_times:
            in_flight = [c.end for c in calls if c.mode == "call" and c.start <= at <= c.end]
            if in_flight:
                recoveries.append(max(in_flight) - at)
        row.recovery = max(recoveries) if recoveries else None
        return row

    def follow_up(self, row: Row, call: Callable[[Any], Any]) -> float:
        """One normal call after a fuzz batch, ``call(job)``, counted in ``row`` by outcome
        (answered with the same job id, wrong, timed out, errored); returns its seconds."""
        app = self.app
        started = time.monotonic()
        job = app.Job(id=uuid.uuid4().hex)
        try:
            got = call(job)
            outcome = "answered" if got.id == job.id else "wrong"
        except app.RPCTimeoutError:
            outcome = "timed_out"
        except Exception:
            outcome = "errored"
        setattr(row, outcome, getattr(row, outcome) + 1)
        return time.monotonic() - started

    # -- scenarios ------------------------------------------------------------------------------

    def sigkill_workers(self) -> Row:
        fleet = [self.worker("w1"), self.worker("w2")]
        time.sleep(3)
        kill_times: list[float] = []

        def kill_one() -> None:
            victim = fleet.pop(0)
            kill_times.append(time.monotonic())
            self.kill(victim)
            fleet.append(self.worker(f"w{len(self.procs) + 1}"))

        # Kills 15 s apart (more than heartbeat_timeout + a maintenance round), so each one hits
        # messages of its own.
        calls = self.load(40, ["plain", "idem"], [(4, kill_one), (19, kill_one), (34, kill_one)])
        counts = self.settle(calls, ["plain", "idem"])
        row = self.row("sigkill-workers (3 kills)", calls, counts, kill_times)
        idem_twice = sum(1 for c in calls if c.kind == "idem" and counts.get(c.id, 0) >= 2)
        row.notes.append(f"idempotent ran twice: {idem_twice}")
        self.stop_all()
        return row

    def redis_restart(self) -> Row:
        self.worker("w1")
        self.worker("w2")
        time.sleep(3)
        back: list[float] = []

        def restart() -> None:
            self.redis.kill()
            time.sleep(3)
            self.redis.start()
            back.append(time.monotonic())

        calls = self.load(16, ["plain", "idem"], [(5, restart)])
        counts = self.settle(calls, ["plain", "idem"])
        row = self.row("redis-restart (AOF always, 3 s down)", calls, counts, [])
        answers = [
            c.end for c in calls if back and c.outcome == "answered" and c.mode == "call" and c.end > back[0]
        ]
        row.recovery = (min(answers) - back[0]) if answers else None
        self.stop_all()
        return row

    def sigkill_rpcserver(self) -> Row:
        servers = [self.rpc_server("s1"), self.rpc_server("s2")]
        time.sleep(3)
        kill_times: list[float] = []

        def kill_one() -> None:
            kill_times.append(time.monotonic())
            self.kill(servers[0])

        calls = self.load(14, ["streams"], [(5, kill_one)])
        counts = self.settle(calls, ["streams"])
        row = self.row("sigkill-rpcserver (1 of 2)", calls, counts, kill_times)
        self.stop_all()
        return row

    def fuzz_queue(self) -> Row:
        from benchmarks.chaos_fuzz import queue_payloads

        self.worker("w1")
        time.sleep(3)
        app = self.app
        client = redis.Redis.from_url(self.redis.url)
        ns, queue = "dramatiq", app.QUEUE
        rng = random.Random(self.seed)
        row = Row("fuzz-queue (malformed messages)")
        slowest = 0.0
        pushed: list[str] = []
        job_ids: list[str] = []
        for batch in range(max(1, self.fuzz // 200)):
            for data, job_id in queue_payloads(rng, 200, queue, batch, reply_prefix=f"{self.tag}:resp:"):
                rid = str(uuid.uuid4())
                if data is not None:
                    client.hset(f"{ns}:{queue}.msgs", rid, data)
                    pushed.append(rid)
                client.rpush(f"{ns}:{queue}", rid)
                client.lpush(f"{ns}:{queue}.wake", "1")
                row.sent += 1
                if job_id:
                    job_ids.append(job_id)
            slowest = max(slowest, self.follow_up(row, lambda job: app.actor("plain").call(job, timeout=30)))
        deadline = time.monotonic() + 30
        while client.llen(f"{ns}:{queue}") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        # Every pushed message was either dead-lettered or processed (ran, or failed for good
        # and dead-lettered); "lost" is what is still waiting anywhere.
        dead = sum(1 for rid in pushed if client.hexists(f"{ns}:{queue}.XQ.msgs", rid))
        waiting = sum(1 for rid in pushed if client.hexists(f"{ns}:{queue}.msgs", rid))
        acks = sum(client.scard(k) for k in client.scan_iter(match=f"{ns}:__acks__*"))
        executed = client.hgetall(f"{self.tag}:exec:plain")
        runs = [int(executed.get(i.encode(), 0)) for i in job_ids]
        row.once = sum(1 for n in runs if n == 1)
        row.twice = sum(1 for n in runs if n >= 2)
        row.lost = waiting + client.llen(f"{ns}:{queue}") + acks
        row.recovery = slowest
        row.notes.append(
            f"dead-lettered {dead}, ran {row.once + row.twice}, follow-up calls after each batch"
        )
        client.close()
        self.stop_all()
        return row

    def fuzz_stream(self) -> Row:
        from benchmarks.chaos_fuzz import stream_entries

        self.rpc_server("s1")
        time.sleep(3)
        app = self.app
        client = redis.Redis.from_url(self.redis.url)
        config = app.config()
        rng = random.Random(self.seed + 1)
        row = Row("fuzz-stream (malformed entries)")
        streams = app.streams_client()
        slowest = 0.0
        for _ in range(max(1, self.fuzz // 200)):
            for fields in stream_entries(rng, 100):
                client.xadd(config.request_stream, fields)
                row.sent += 1
            answer = self.follow_up(row, lambda job: streams.call("chaos_echo", job, app.Done, 30))
            slowest = max(slowest, answer)
        time.sleep(3)
        pending = client.xpending(config.request_stream, config.consumer_group)["pending"]
        row.lost = int(pending)
        row.recovery = slowest
        row.notes.append(f"still pending after the run: {pending}")
        client.close()
        self.stop_all()
        return row

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> list[Row]:
        os.environ["CHAOS_REDIS_URL"] = self.redis.url
        os.environ["CHAOS_TAG"] = self.tag
        self.redis.start()
        from benchmarks import chaos_client

        self.app = chaos_client
        try:
            for scenario in (
                self.sigkill_workers,
                self.redis_restart,
                self.sigkill_rpcserver,
                self.fuzz_queue,
                self.fuzz_stream,
            ):
                if self.only and scenario.__name__ not in self.only:
                    continue
                print(f"-- {scenario.__name__} ...", file=sys.stderr, flush=True)
                started = time.monotonic()
                self.rows.append(scenario())
                print(f"   done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
        finally:
            self.stop_all()
            self.redis.close()
        return self.rows


def table(rows: list[Row]) -> str:
    head = (
        "| scenario | sent | executed once | executed twice | lost | callers answered / timed out / "
        "errored / answered wrongly | recovery time |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        rec = "-" if r.recovery is None else f"{r.recovery:.2f} s"
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(
            f"| {r.scenario}{notes} | {r.sent} | {r.once} | {r.twice} | {r.lost} | "
            f"{r.answered} / {r.timed_out} / {r.errored} / {r.wrong} | {rec} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fuzz", type=int, default=2000, help="malformed queue messages (stream: half)")
    parser.add_argument("--only", default="", help="comma-separated scenario method names (default: all)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    suite = Suite(args.seed, args.fuzz)
    suite.only = [name for name in args.only.split(",") if name]
    rows = suite.run()
    print(table(rows))
    print(f"\n(seed {args.seed}, {time.monotonic() - started:.0f} s)")
    return 0 if all(r.lost == 0 and r.wrong == 0 and r.timed_out == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
