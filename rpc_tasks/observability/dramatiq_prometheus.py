"""Dramatiq's own ``Prometheus`` middleware, cheaper on every message: what
``setup_broker(metrics=True)`` and :data:`rpc_tasks.observability.METRICS_PATHS` install.

Dramatiq's middleware costs about 13 µs per message in a tight loop (four ``labels()`` lookups,
each taking a lock and building a key, and its multi-process file writes), more with a cold cache,
all of it between the actor's return and the ack; ``BlockingRedisBroker`` pushes a ``.call()``
reply together with the ack, so every call waited for it. :class:`RPCPrometheus` keeps its
series, exposition server and multi-process folder, and changes two things.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.common import current_millis
from dramatiq.middleware.prometheus import Prometheus

from .deferred import updates

__all__ = ["RPCPrometheus"]


class RPCPrometheus(Prometheus):
    """:class:`dramatiq.middleware.prometheus.Prometheus` (same ``dramatiq_*`` series, same
    exposition server on ``dramatiq_prom_port``), with:

    * the label children of each (queue, actor) looked up once, not four times per message;
    * the per-message updates (in-progress gauge, duration histogram, processed and errored
      totals) queued and applied by a flusher thread (:mod:`rpc_tasks.observability.deferred`),
      at most a second later and before the worker process exits, instead of delaying the
      ack and a ``.call()`` reply. The duration is still measured at the end of the run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    def _series(self, message: Any) -> tuple[Any, Any, Any, Any]:
        """(in progress, durations, total, errored) children of ``message``'s queue and actor."""
        key = (message.queue_name, message.actor_name)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (
                self.inprogress_messages.labels(*key),
                self.message_durations.labels(*key),
                self.total_messages.labels(*key),
                self.total_errored_messages.labels(*key),
            )
        return found

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.message_id in self.delayed_messages:  # Dramatiq's delayed bookkeeping too
            super().before_process_message(broker, message)  # type: ignore[no-untyped-call]
            return
        updates.inc(self._series(message)[0])
        self.message_start_times[message.message_id] = current_millis()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        now = current_millis()
        started = self.message_start_times.pop(message.message_id, now)
        in_progress, durations, total, errored = self._series(message)
        updates.observe(durations, now - started)
        updates.inc(in_progress, -1)
        updates.inc(total)
        if exception is not None:
            updates.inc(errored)

    after_skip_message = after_process_message

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        updates.flush()  # before Dramatiq marks this process's files dead
        super().after_worker_shutdown(broker, worker)  # type: ignore[no-untyped-call]
