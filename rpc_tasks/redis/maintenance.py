"""Periodic queue maintenance for :class:`~rpc_tasks.redis.broker.BlockingRedisBroker`.

Dramatiq requeues the unacked messages of dead workers (and drops expired dead letters) only
during "maintenance", which its dispatch script runs with probability ``maintenance_chance``
per million commands: on a quiet system a crashed worker's messages can wait for hours. Here
one daemon thread per broker and process (started by the first consumer) runs that
maintenance, through Dramatiq's own script, for each queue the process consumes, every
``heartbeat_timeout / 4``; it also keeps the process's heartbeat fresh while all its worker
threads are busy with long messages (otherwise another worker would take it for dead).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

logger = logging.getLogger(__name__)


class Maintenance:
    """The maintenance thread of one broker in one process: every ``heartbeat_timeout / 4``
    it runs :meth:`BlockingRedisBroker.run_maintenance` for each watched queue. Restarted in a
    forked child on its first consumer."""

    def __init__(self, broker: Any) -> None:
        self._broker = weakref.ref(broker)
        self.interval = max(0.05, broker.heartbeat_timeout / 4000.0)
        self.queues: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, queue_name: str) -> None:
        with self._lock:
            self.queues.add(queue_name)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._stop = threading.Event()
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="rpc-tasks-maintenance", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(self.interval):
            broker = self._broker()
            if broker is None:
                return
            with self._lock:
                queues = sorted(self.queues)
            try:
                for queue_name in queues:
                    broker.run_maintenance(queue_name)
                failing = False
            except Exception as exc:  # Redis down: try again next round, say so once
                if not failing:
                    logger.warning("Queue maintenance failed (will retry): %s", exc)
                failing = True
            del broker
