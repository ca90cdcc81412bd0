"""Django integration (a Django app: add ``"rpc_tasks.contrib.django"`` to ``INSTALLED_APPS``
after ``"django_dramatiq"``).

* :func:`dramatiq_broker_settings` - django-dramatiq ``DRAMATIQ_BROKER`` with rpc-tasks'
  middleware in the right order (and never ``dramatiq.middleware.Prometheus``);
* :func:`rpc_method` - register a handler served by ``manage.py rpc_serve`` (``--bridge``: the
  requests browsers send through the WebSocket server);
* system checks (``manage.py check``), ``manage.py rpc_serve`` and ``manage.py rpc_health``;
* test helpers in :mod:`rpc_tasks.testing` (``RPCTestCaseMixin`` for Django ``TestCase``).
"""

from __future__ import annotations

from .registry import handlers, rpc_method
from .settings import DRAMATIQ_ENCODER, dramatiq_broker_settings

__all__ = ["DRAMATIQ_ENCODER", "dramatiq_broker_settings", "handlers", "rpc_method"]
