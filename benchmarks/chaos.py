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

The private Redis, the processes, the load and the accounting are in
:mod:`benchmarks.chaos_harness`; the scenarios are here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid

import redis

from benchmarks.chaos_harness import Harness, Row, table


class Suite(Harness):
    """The scenarios, run in order by :meth:`run` (``--only`` picks them by method name)."""

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
