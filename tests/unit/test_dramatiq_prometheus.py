"""RPCPrometheus: Dramatiq's ``dramatiq_*`` series with the same values as Dramatiq's own
middleware, its per-message updates queued and applied off the message's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware.prometheus import Prometheus

pytest.importorskip("prometheus_client")

from rpc_tasks.observability import RPCPrometheus, install_metrics
from rpc_tasks.observability.deferred import updates


@pytest.fixture
def booted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A booted RPCPrometheus whose files go to a private folder (boot sets the env vars)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("prometheus_multiproc_dir", str(tmp_path))

    def boot(middleware: Prometheus, broker: dramatiq.Broker) -> Prometheus:
        middleware.after_process_boot(broker)
        return middleware

    return boot


def value(series: Any, *labels: str) -> float:
    return float(series.labels(*labels)._value.get())


def test_updates_are_queued_off_the_message_path_and_applied_by_a_flush(booted: Any) -> None:
    broker = StubBroker()
    mw = booted(RPCPrometheus(), broker)
    message = MessageProxy(dramatiq.Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}))
    updates.flush()
    mw.before_process_message(broker, message)
    mw.after_process_message(broker, message, result=None)
    failed = MessageProxy(dramatiq.Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}))
    mw.before_process_message(broker, failed)
    # Nothing was written on the messages' path (the files of the multi-process folder included).
    assert value(mw.total_messages, "q", "a") == 0 and value(mw.inprogress_messages, "q", "a") == 0
    updates.flush()
    assert value(mw.total_messages, "q", "a") == 1 and value(mw.inprogress_messages, "q", "a") == 1
    mw.after_process_message(broker, failed, exception=ValueError("no"))
    updates.flush()
    assert value(mw.total_messages, "q", "a") == 2 and value(mw.inprogress_messages, "q", "a") == 0
    assert value(mw.total_errored_messages, "q", "a") == 1
    durations = mw.message_durations.labels("q", "a")
    assert sum(bucket.get() for bucket in durations._buckets) == 2


def test_same_values_as_dramatiqs_middleware_with_a_real_worker(booted: Any) -> None:
    def run(middleware: Prometheus) -> dict[str, float]:
        broker = StubBroker()
        broker.emit_after("process_boot")
        broker.add_middleware(middleware)
        booted(middleware, broker)

        @dramatiq.actor(broker=broker, queue_name="prom", max_retries=0)
        def job(fail: bool) -> None:
            if fail:
                raise ValueError("no")

        for fail in (False, False, False, True):
            job.send(fail)
        worker = dramatiq.Worker(broker, worker_timeout=50)
        worker.start()
        try:
            broker.join("prom", fail_fast=False)
            worker.join()
        finally:
            worker.stop()  # its consumer threads finish their acks (and the ack hooks) first
        labels = ("prom", "job")
        return {
            "total": value(middleware.total_messages, *labels),
            "errored": value(middleware.total_errored_messages, *labels),
            "rejected": value(middleware.total_rejected_messages, *labels),
            "in_progress": value(middleware.inprogress_messages, *labels),
            "durations": float(middleware.message_durations.labels(*labels)._sum.get() >= 0),
        }

    theirs = run(Prometheus())
    ours = run(RPCPrometheus())
    assert theirs == {"total": 4.0, "errored": 1.0, "rejected": 1.0, "in_progress": 0.0, "durations": 1.0}
    assert ours == theirs


def test_install_metrics_adds_it_unless_a_prometheus_middleware_is_there() -> None:
    broker = StubBroker()
    install_metrics(broker)
    assert sum(isinstance(m, Prometheus) for m in broker.middleware) == 1
    assert any(type(m) is RPCPrometheus for m in broker.middleware)
    kept = StubBroker()
    kept.add_middleware(Prometheus())
    install_metrics(kept)
    assert [type(m) for m in kept.middleware if isinstance(m, Prometheus)] == [Prometheus]
