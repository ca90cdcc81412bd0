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
                hint="Add 'django_dramatiq' before 'rpc_tasks.contrib.django'",
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
    if any(str(m).endswith(".Prometheus") for m in broker_settings["MIDDLEWARE"]):
        problems.append(
            Error(
                "dramatiq.middleware.Prometheus does not exist in Dramatiq 2.x",
                hint="Remove it from DRAMATIQ_BROKER['MIDDLEWARE']",
                id=ID.format("E005"),
            )
        )
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
