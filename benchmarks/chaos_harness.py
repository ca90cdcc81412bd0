"""The fault suite's machinery (:mod:`benchmarks.chaos` has the scenarios): a private restartable
redis-server, worker and ``RPCServer`` processes, load from caller threads with faults at given
times, and the accounting of what happened to every message and caller (:class:`Row`,
:func:`table`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
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

from benchmarks.common import free_port
from benchmarks.procs import Worker

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A private redis-server with AOF (``appendfsync always``), restartable on its port/dir."""

    def __init__(self) -> None:
        self.port = free_port()
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


class Harness:
    """Processes, load and accounting of the suite; the scenarios subclass it
    (:class:`benchmarks.chaos.Suite`). ``app`` is :mod:`benchmarks.chaos_client`, imported once
    the private Redis runs."""

    app: Any

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
