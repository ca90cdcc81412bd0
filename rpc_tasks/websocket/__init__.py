"""The reference WebSocket server (``rpc-tasks ws``): browsers connect here; Django reaches
them over Redis. Needs ``pip install rpc-tasks[websocket]`` to serve.

* :mod:`.server` - :class:`WebSocketServer`: listener, socket lifecycle, heartbeats;
* :mod:`.connection` - one socket (send queue, writer, rate bucket);
* :mod:`.frames` - the JSON frames and close codes;
* :mod:`.fanout` - delivery across instances over Pub/Sub;
* :mod:`.methods` - the RPC methods served from the request stream;
* :mod:`.bridge` - browser requests forwarded to Django;
* :mod:`.store` - presence, rooms and acks in Redis; :mod:`.auth` - connection tokens.
"""

from .auth import TokenClaims, TokenError, make_token, verify_token
from .models import BridgeParams, PresenceQuery, PresenceResponse, RoomRequest, RoomResponse
from .server import WebSocketServer

__all__ = [
    "BridgeParams",
    "PresenceQuery",
    "PresenceResponse",
    "RoomRequest",
    "RoomResponse",
    "TokenClaims",
    "TokenError",
    "WebSocketServer",
    "make_token",
    "verify_token",
]
