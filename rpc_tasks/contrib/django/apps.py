"""The Django app of rpc-tasks."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules


class RPCTasksConfig(AppConfig):
    """Registers the system checks and autodiscovers ``<app>.rpc`` handler modules.

    Listed before ``django_dramatiq`` in ``INSTALLED_APPS``, it also stops start-up with the
    system check's own message (``rpc_tasks.E004`` / ``E005``) when django-dramatiq would fail
    with an ``ImportError`` while building its broker (it does that while apps load, before any
    check runs)."""

    name = "rpc_tasks.contrib.django"
    label = "rpc_tasks"
    verbose_name = "rpc-tasks"

    def __init__(self, app_name: str, app_module: Any) -> None:
        super().__init__(app_name, app_module)
        from .checks import startup_problem

        problem = startup_problem()
        if problem is not None:
            raise ImproperlyConfigured(problem)

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)

        autodiscover_modules("rpc")
