"""Actors of the example app (autodiscovered by django-dramatiq; ``manage.py rundramatiq``)."""

import dramatiq
from pydantic import BaseModel

from rpc_tasks import NotificationRequest, NotificationResponse, get_rpc_client, rpc_actor


class AddParams(BaseModel):
    a: int
    b: int


class AddResult(BaseModel):
    total: int


@rpc_actor(queue_name="notifications")
def add(params: AddParams) -> AddResult:
    """A plain typed actor: ``add.call(AddParams(a=1, b=2), timeout=5)`` from a view."""
    return AddResult(total=params.a + params.b)


class NotifyParams(BaseModel):
    user_id: str
    message: str


class NotifyResult(BaseModel):
    delivered: bool
    user_connected: bool


@rpc_actor(queue_name="notifications", max_retries=3, min_backoff=500)
def send_async_notification(params: NotifyParams) -> NotifyResult:
    """The seed's "Integration with Dramatiq" example as an ``@rpc_actor``: a remote
    ``rate_limit_exceeded`` / ``service_unavailable`` from the WebSocket server becomes a retry
    that honours ``retry_after``."""
    rpc = get_rpc_client()  # inside the function: cheap (a singleton), and fakeable in tests
    result: NotificationResponse = rpc.call(
        method="send_notification",
        params=NotificationRequest(
            user_id=params.user_id,
            notification_type="async_event",
            title="Event Notification",
            message=params.message,
        ),
        result_model=NotificationResponse,
    )
    return NotifyResult(delivered=result.delivered, user_connected=result.user_connected)


rpc = get_rpc_client()


@dramatiq.actor(queue_name="notifications", max_retries=3)
def send_async_notification_seed(user_id: str, message: str):
    """The seed's example exactly as written (a plain Dramatiq actor calling the client)."""

    result: NotificationResponse = rpc.call(
        method="send_notification",
        params=NotificationRequest(
            user_id=user_id,
            notification_type="async_event",
            title="Event Notification",
            message=message,
        ),
        result_model=NotificationResponse,
    )

    return result.model_dump()
