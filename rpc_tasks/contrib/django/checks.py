"""``manage.py check`` for rpc-tasks: settings valid, Redis for replies configured, broker
middleware present and in order."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from ...config import WebSocketRPCConfig
from ...exceptions import RPCConfigurationError
from .settings import DRAMATIQ_ENCODER

ID = "rpc_tasks.{}"

#: Where Dramatiq 2.x keeps the Prometheus middleware that django-dramatiq's default still names
#: under its 1.x path.
PROMETHEUS_PATHS = ("dramatiq.middleware.Prometheus", "dramatiq.middleware.prometheus.Prometheus")


def broken_middleware(paths: Any) -> list[tuple[str, str]]:
    """``(path, why)`` for each dotted middleware path that does not import (instances and
    classes given directly are fine)."""
    from django.utils.module_loading import import_string

    broken = []
    for path in paths or []:
        if not isinstance(path, str):
            continue
        try:
            import_string(path)
        except ImportError as exc:
            broken.append((path, str(exc)))
    return broken


def _e005(path: str, reason: str) -> tuple[str, str]:
    hint = f"Fix or remove {path!r} in DRAMATIQ_BROKER['MIDDLEWARE']"
    if path == PROMETHEUS_PATHS[0]:
        hint = f"Dramatiq 2.x moved it: use {PROMETHEUS_PATHS[1]!r}, or remove it"
    return f"DRAMATIQ_BROKER['MIDDLEWARE'] names {path!r}, which does not import: {reason}", hint


def startup_problem() -> str | None:
    """What would make django-dramatiq fail while apps load (it builds the broker then, before
    any system check can run): a middleware path in ``DRAMATIQ_BROKER`` (or in its default, when
    the setting is missing) that does not import. Checked by rpc-tasks' app when it is listed
    before ``django_dramatiq`` in ``INSTALLED_APPS``, so the error names the fix."""
    if "django_dramatiq" not in getattr(settings, "INSTALLED_APPS", ()):
        return None  # E003 reports that
    broker_settings = getattr(settings, "DRAMATIQ_BROKER", None)
    if not broker_settings:
        return (
            f"{ID.format('E004')}: DRAMATIQ_BROKER is not set, and django-dramatiq's default names "
            f"{PROMETHEUS_PATHS[0]!r}, which Dramatiq 2.x no longer has. Set DRAMATIQ_BROKER = "
            "rpc_tasks.contrib.django.dramatiq_broker_settings(url)."
        )
    broken = broken_middleware(broker_settings.get("MIDDLEWARE"))
    if not broken:
        return None
    return "; ".join(f"{ID.format('E005')}: {' - '.join(_e005(path, why))}" for path, why in broken)


@register(Tags.compatibility)
def check_rpc_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Validate ``WEBSOCKET_RPC`` and that Redis for replies is configured."""
    problems: list[Any] = []
    value = getattr(settings, "WEBSOCKET_RPC", None)
    if value:
        try:
            WebSocketRPCConfig.from_mapping(value)
        except RPCConfigurationError as exc:
            problems.append(Error(str(exc), hint="Fix settings.WEBSOCKET_RPC", id=ID.format("E001")))
    elif not (os.environ.get("WEBSOCKET_RPC_REDIS_URL") or os.environ.get("REDIS_URL")):
        problems.append(
            Error(
                "Redis for RPC replies is not configured",
                hint="Set WEBSOCKET_RPC = WebSocketRPCConfig(enabled=True, redis_url=...)"
                ".to_django_settings()['WEBSOCKET_RPC'] (or the WEBSOCKET_RPC_REDIS_URL environment "
                "variable)",
                id=ID.format("E002"),
            )
        )
    return problems


@register(Tags.compatibility)
def check_dramatiq_broker(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The broker django-dramatiq built must carry rpc-tasks' middleware in order."""
    from django.apps import apps

    problems: list[Any] = []
    if not apps.is_installed("django_dramatiq"):
        return [
            Error(
                "django_dramatiq is not in INSTALLED_APPS",
                hint="Add 'django_dramatiq' to INSTALLED_APPS, after 'rpc_tasks.contrib.django' (so "
                "rpc-tasks reports a broken DRAMATIQ_BROKER before django-dramatiq loads it)",
                id=ID.format("E003"),
            )
        ]
    broker_settings = getattr(settings, "DRAMATIQ_BROKER", None)
    if not broker_settings or "MIDDLEWARE" not in broker_settings:
        problems.append(
            Error(
                "DRAMATIQ_BROKER has no explicit MIDDLEWARE list; django-dramatiq's default lacks rpc-tasks' "
                "middleware and names dramatiq.middleware.Prometheus, which Dramatiq 2.x no longer has",
                hint="DRAMATIQ_BROKER = rpc_tasks.contrib.django.dramatiq_broker_settings(url)",
                id=ID.format("E004"),
            )
        )
        return problems
    for path, reason in broken_middleware(broker_settings["MIDDLEWARE"]):
        problems.append(Error(*_e005(path, reason), id=ID.format("E005")))
    import dramatiq

    from ...middleware.order import check_broker

    for problem in check_broker(dramatiq.get_broker()):
        problems.append(
            Error(
                f"Dramatiq broker: {problem}",
                hint="Use DRAMATIQ_BROKER = rpc_tasks.contrib.django.dramatiq_broker_settings(url)",
                id=ID.format("E006"),
            )
        )
    if getattr(settings, "DRAMATIQ_ENCODER", None) != DRAMATIQ_ENCODER:
        problems.append(
            Warning(
                "DRAMATIQ_ENCODER is not rpc-tasks' encoder: a structurally invalid message would make a "
                ".call() caller wait for its timeout instead of getting an invalid_request error",
                hint=f"DRAMATIQ_ENCODER = {DRAMATIQ_ENCODER!r}",
                id=ID.format("W001"),
            )
        )
    return problems
