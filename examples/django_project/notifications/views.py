"""Views of the example app."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from rpc_tasks import (
    NotificationPriority,
    NotificationRequest,
    NotificationResponse,
    RPCRemoteError,
    RPCTimeoutError,
    get_rpc_client,
)
from rpc_tasks.websocket.auth import make_token

from .tasks import AddParams, NotifyParams, add, send_async_notification

rpc = get_rpc_client()


def notify_user(request: HttpRequest, user_id: str) -> JsonResponse:
    """Send notification to user via WebSocket (the seed's Quick Start, step 2, as written)."""

    result: NotificationResponse = rpc.call(
        method="send_notification",
        params=NotificationRequest(
            user_id=user_id,
            notification_type="order_update",
            title="Order Confirmed",
            message="Your order #12345 has been confirmed",
            priority=NotificationPriority.HIGH,
        ),
        result_model=NotificationResponse,
        timeout=10,
    )

    return JsonResponse(
        {
            "delivered": result.delivered,
            "user_connected": result.user_connected,
        }
    )


def notify_async(request: HttpRequest, user_id: str) -> JsonResponse:
    """Background delivery: ``.send()`` returns at once with the Dramatiq message id."""
    message = send_async_notification.send(
        NotifyParams(user_id=user_id, message=request.GET.get("m", "Hello!"))
    )
    return JsonResponse({"queued": message.message_id})


def add_view(request: HttpRequest) -> JsonResponse:
    """A synchronous ``.call()`` through a Dramatiq worker."""
    try:
        result = add.call(AddParams(a=request.GET.get("a", 0), b=request.GET.get("b", 0)), timeout=5)
    except RPCTimeoutError as exc:
        return JsonResponse({"error": str(exc)}, status=504)
    except RPCRemoteError as exc:
        return JsonResponse({"error": exc.error.model_dump(mode="json")}, status=502)
    return JsonResponse({"total": result.total})


async def add_async_view(request: HttpRequest) -> JsonResponse:
    """The same call from an async view: ``await add.acall(...)`` waits without a thread (the
    reply comes through the event loop's one reply reader)."""
    try:
        result = await add.acall(AddParams(a=request.GET.get("a", 0), b=request.GET.get("b", 0)), timeout=5)
    except RPCTimeoutError as exc:
        return JsonResponse({"error": str(exc)}, status=504)
    except RPCRemoteError as exc:
        return JsonResponse({"error": exc.error.model_dump(mode="json")}, status=502)
    return JsonResponse({"total": result.total})


def page(request: HttpRequest, user_id: str) -> HttpResponse:
    """A page that connects to the WebSocket server as ``user_id`` and shows notifications."""
    return render(
        request,
        "notifications/page.html",
        {
            "user_id": user_id,
            "ws_url": settings.WEBSOCKET_RPC["websocket_url"].rstrip("/") + "/ws",
            "token": make_token(user_id, ttl=3600),
        },
    )


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        '<p>Open <a href="/page/alice/">/page/alice/</a>, then '
        '<a href="/notify/alice/">/notify/alice/</a> (a .call() through the WebSocket server) or '
        '<a href="/notify-async/alice/">/notify-async/alice/</a> (a .send() to a Dramatiq worker).</p>'
    )
