"""The comparison libraries' synchronous paths of the benchmark (client side): plain Dramatiq
(``dramatiq-send``, ``dramatiq-results``, ``inflight-dramatiq``) and Celery (``celery``). The
async peers (taskiq, arq) are in :mod:`benchmarks.aio_paths` and :mod:`benchmarks.arq_paths`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import MESSAGE
from benchmarks.paths import CALL_TIMEOUT, Path, build, run_in_batches, send_and_join


class DramatiqResultsPath(Path):
    """Dramatiq's own: ``actor.send(x).get_result(block=True)`` with the Redis result backend."""

    name = "dramatiq-results"

    def setup(self) -> None:
        import dramatiq

        self.broker, self.actor, self.queue = build("results")
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
        send = self.actor.send

        def one_batch(size: int) -> list[Any]:
            messages = [send(MESSAGE) for _ in range(size)]
            return [m.get_result(block=True) for m in messages]

        return run_in_batches(n, bar, self.batch, one_batch, lambda rs, _: all(r == MESSAGE for r in rs))


class DramatiqSendPath(Path):
    """Dramatiq's own ``actor.send(x)`` (plain ``@dramatiq.actor``, ``RedisBroker``, no
    rpc-tasks code), measured exactly like ``send``."""

    name = "dramatiq-send"
    first_call = False

    def setup(self) -> None:
        self.broker, self.actor, self.queue = build("dramatiq")
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
