"""django-dramatiq settings with rpc-tasks' tracing and metrics middleware pass ``manage.py check``
(E005: every path imports; E006: our middleware in order in the broker django-dramatiq built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_checks_startup import manage_check

pytest.importorskip("opentelemetry")
pytest.importorskip("prometheus_client")


def test_with_observability_middleware_passes_the_checks(tmp_path: Path) -> None:
    broker = (
        "from rpc_tasks.observability import with_observability\n"
        'DRAMATIQ_BROKER = dramatiq_broker_settings("redis://127.0.0.1:6379/9")\n'
        'DRAMATIQ_BROKER["MIDDLEWARE"] = with_observability(DRAMATIQ_BROKER["MIDDLEWARE"], tracing=True, '
        "metrics=True)\n"
    )
    result = manage_check(tmp_path, broker)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
