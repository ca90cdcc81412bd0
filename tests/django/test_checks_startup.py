"""``manage.py check`` with a broken ``DRAMATIQ_BROKER``: django-dramatiq builds its broker while
apps load, so rpc-tasks' app (listed first) stops start-up with the check's own message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rpc_tasks.contrib.django.checks import broken_middleware

SETTINGS = """
import rpc_tasks
from rpc_tasks.contrib.django import dramatiq_broker_settings

SECRET_KEY = "test"
INSTALLED_APPS = ["django.contrib.contenttypes", "rpc_tasks.contrib.django", "django_dramatiq"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}}
WEBSOCKET_RPC = {{"redis_url": "redis://127.0.0.1:6379/9"}}
DRAMATIQ_ENCODER = "rpc_tasks.encoder.RPCJSONEncoder"
{broker}
"""


def manage_check(tmp_path: Path, broker: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "probe_settings.py").write_text(textwrap.dedent(SETTINGS.format(broker=broker)))
    return subprocess.run(
        [sys.executable, "-m", "django", "check"],
        cwd=tmp_path,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "probe_settings", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_old_prometheus_path_stops_start_up_with_e005_naming_the_new_path(tmp_path: Path) -> None:
    broker = (
        'DRAMATIQ_BROKER = dramatiq_broker_settings("redis://127.0.0.1:6379/9", '
        'extra_middleware=["dramatiq.middleware.Prometheus"])'
    )
    result = manage_check(tmp_path, broker)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "rpc_tasks.E005" in last and "dramatiq.middleware.prometheus.Prometheus" in last


def test_missing_dramatiq_broker_stops_start_up_with_e004(tmp_path: Path) -> None:
    result = manage_check(tmp_path, "")
    assert result.returncode != 0
    assert "rpc_tasks.E004" in result.stderr.strip().splitlines()[-1]


def test_new_prometheus_path_passes_the_checks(tmp_path: Path) -> None:
    broker = (
        'DRAMATIQ_BROKER = dramatiq_broker_settings("redis://127.0.0.1:6379/9", '
        'extra_middleware=["dramatiq.middleware.prometheus.Prometheus"])'
    )
    result = manage_check(tmp_path, broker)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    "path, broken",
    [
        ("dramatiq.middleware.Prometheus", True),
        ("dramatiq.middleware.prometheus.Prometheus", False),
        ("rpc_tasks.middleware.RPCReplies", False),
        ("myapp.nothere.Middleware", True),
    ],
)
def test_e005_flags_only_paths_that_do_not_import(path: str, broken: bool) -> None:
    assert bool(broken_middleware([path])) is broken
