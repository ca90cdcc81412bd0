"""Handlers for requests browsers send through the WebSocket server (``manage.py rpc_serve --bridge``)."""

from datetime import datetime, timezone

from django.contrib.auth import get_user_model
from pydantic import BaseModel

from rpc_tasks.contrib.django import rpc_method
from rpc_tasks.websocket.models import BridgeParams


class WhoAmI(BaseModel):
    user_id: str
    known_user: bool
    server_time: datetime


@rpc_method("whoami")
def whoami(params: BridgeParams) -> WhoAmI:
    """``params.user_id`` is the authenticated user of the socket (browsers cannot choose it)."""
    known = get_user_model().objects.filter(username=params.user_id).exists()
    return WhoAmI(user_id=params.user_id, known_user=known, server_time=datetime.now(timezone.utc))
