"""The quick-start demo: starts a worker and shows ``.send()``, ``.call()``, a typed remote
error, a timeout and rejected params. Run with ``make demo`` (or
``python -m examples.quickstart.demo`` inside the venv)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

from pydantic import ValidationError

from examples.quickstart.local_redis import local_redis


def main() -> int:
    with local_redis() as url:
        os.environ["REDIS_URL"] = url
        os.environ.pop("WEBSOCKET_RPC_REDIS_URL", None)
        os.environ.pop("DRAMATIQ_BROKER_URL", None)
        print(f"[demo] Redis: {url.split('@')[-1]}")
        from examples.quickstart import tasks
        from rpc_tasks import RPCRemoteError, RPCTimeoutError

        tasks.broker.client.delete(tasks.RECORD_KEY)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "examples.quickstart.tasks",
                "--processes",
                "1",
                "--threads",
                "4",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            print("[demo] worker started (dramatiq examples.quickstart.tasks); waiting for it")
            deadline = time.monotonic() + 60
            while True:
                try:
                    tasks.echo.call(tasks.EchoParams(message="ready?"), timeout=2)
                    break
                except RPCTimeoutError:
                    if time.monotonic() > deadline or worker.poll() is not None:
                        print("[demo] the worker did not come up", file=sys.stderr)
                        return 1

            print("\n1. .send(): background delivery")
            msg = tasks.record.send(tasks.RecordParams(text="hello from .send()"))
            print(f"   enqueued message {msg.message_id}")
            for _ in range(100):
                got = tasks.broker.client.lrange(tasks.RECORD_KEY, 0, -1)
                if got:
                    print(f"   the worker ran it: {got[0].decode()!r}")
                    break
                time.sleep(0.05)
            else:
                print("   (not processed within 5 s)")

            print("\n2. .call(): typed result")
            result = tasks.echo.call(tasks.EchoParams(message="hi"), timeout=2.5)
            print(f"   echo.call(EchoParams(message='hi')) -> {result!r}")
            samples = []
            for i in range(200):
                t0 = time.perf_counter()
                tasks.echo.call(tasks.EchoParams(message=str(i)), timeout=2.5)
                samples.append((time.perf_counter() - t0) * 1000)
            samples.sort()
            print(
                f"   200 sequential calls: p50 {statistics.median(samples):.2f} ms, "
                f"p95 {samples[int(len(samples) * 0.95)]:.2f} ms"
            )

            print("\n3. remote error: typed, with code and retry_after")
            try:
                tasks.notify.call(tasks.NotifyParams(user_id="mallory", text="hi"), timeout=5)
            except RPCRemoteError as exc:
                print(
                    f"   RPCRemoteError: code={exc.error.code.value} retryable={exc.is_retryable} "
                    f"retry_after={exc.retry_after} message={exc.error.message!r}"
                )
            ok = tasks.notify.call(tasks.NotifyParams(user_id="alice", text="hi"), timeout=5)
            print(f"   notify(alice) -> {ok!r}")

            print("\n4. timeout: millisecond precision")
            t0 = time.perf_counter()
            try:
                tasks.sleepy.call(tasks.SleepParams(seconds=2), timeout=0.25)
            except RPCTimeoutError as exc:
                print(
                    f"   RPCTimeoutError after {time.perf_counter() - t0:.3f} s: {exc} "
                    f"(method={exc.method}, timeout_seconds={exc.timeout_seconds})"
                )

            print("\n5. invalid params fail before anything is enqueued")
            try:
                tasks.echo.send({"message": 42})
            except ValidationError as exc:
                print(f"   ValidationError: {exc.errors()[0]['msg']}")
            print("\n[demo] done")
            return 0
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    raise SystemExit(main())
