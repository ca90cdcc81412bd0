"""The Django app of rpc-tasks."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class RPCTasksConfig(AppConfig):
    """Registers the system checks and autodiscovers ``<app>.rpc`` handler modules."""

    name = "rpc_tasks.contrib.django"
    label = "rpc_tasks"
    verbose_name = "rpc-tasks"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)

        autodiscover_modules("rpc")
