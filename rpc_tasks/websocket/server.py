"""The reference WebSocket server: browsers connect here; Django reaches them over Redis.

``rpc-tasks ws --host 127.0.0.1 --port 8765`` starts it (needs ``pip install rpc-tasks[websocket]``
and ``websocket_secret`` in the config). It

* authenticates each socket with an HS256 JWT (:mod:`rpc_tasks.websocket.auth`): ``?token=...``
  or an ``Authorization: Bearer`` header (a forged or expired token is refused with close code
  **4401** and the reason), or, from a socket that brings neither, django-ipc's first frame
  ``Bearer <JWT>``; such a socket speaks django-ipc's frames (:mod:`rpc_tasks.websocket.ipc`);
* accepts the upgrade on any path (``/``, ``/ws``, ...); plain HTTP gets the demo page at ``/``,
  ``/healthz`` (text) and ``/health`` (JSON);
* hosts the Streams consumer (:class:`~rpc_tasks.streams.server.RPCServer`) with the methods
  ``send_notification``, ``send_batch_notifications``, ``broadcast``, ``join_room``,
  ``leave_room``, ``get_presence`` (plus ``ping``/``echo``);
* keeps presence in Redis with TTL heartbeats and fans deliveries out to the instance that holds
  a user's socket over Pub/Sub, so several instances behind one Redis act as one;
* listens on ``broadcast_channel`` so ``WebSocketRPCClient.broadcast()`` (a plain ``PUBLISH``)
  reaches every connected user on every instance; ``PUBLISH`` returns the number of instances;
* forwards browser requests to Django over ``bridge_stream`` when ``enable_bridge`` is on;
* bounds everything: per-connection send queue (a slow reader is disconnected, close code
  **4008**), maximum frame size (**1009**), per-connection message rate (an error frame with
  ``rate_limit_exceeded`` and ``retry_after``);
* serves a tiny demo page at ``/`` (``/?token=...``) that shows incoming notifications.

Native frames to browsers are JSON ``{"type", "id", "payload", "timestamp"}``; ``type`` is one of
``welcome``, ``notification``, ``broadcast``, ``response``, ``error``, ``pong``.
Frames from browsers: ``{"type": "ping"}`` or
``{"type": "request", "id": "...", "method": "...", "params": {...}}`` (the bridge).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import signal
import uuid
from collections import Counter
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import metrics
from ..config import WebSocketRPCConfig, get_config
from ..exceptions import RPCConfigurationError, RPCException
from ..models.connections import ConnectionInfo
from ..models.errors import RPCErrorCode
from . import frames
from .auth import TokenClaims, TokenError, verify_token
from .bridge import MAX_IN_FLIGHT, Bridge
from .connection import Connection
from .fanout import Fanout
from .ipc import AUTH_TIMEOUT, IpcDialect, auth_frame, brings_token, first_frame_login, to_ipc
from .methods import ServerMethods
from .store import AsyncWSStore

logger = logging.getLogger(__name__)
#: What the ``websockets`` library logs about this server's connections (handshakes at
#: DEBUG), with connection tokens redacted.
wire_logger = logging.getLogger(f"{__name__}.wire")


class RedactTokens(logging.Filter):
    """Replaces connection tokens (``token=...`` in a URL, ``Authorization: Bearer ...``)
    in log records with ``[redacted]``."""

    _PATTERN = re.compile(r"(token=)[^&\s\"']+|(bearer\s+)[^\s\"']+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._PATTERN.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


wire_logger.addFilter(RedactTokens())


class WebSocketServer:
    """One instance of the WebSocket server (run several behind one Redis to scale out).

    It listens for sockets (:class:`~rpc_tasks.websocket.connection.Connection`), keeps them
    in a :class:`~rpc_tasks.websocket.fanout.Fanout` that delivers across instances, serves
    :class:`~rpc_tasks.websocket.methods.ServerMethods` from the request stream and forwards
    browser requests over the :class:`~rpc_tasks.websocket.bridge.Bridge`.

    Args:
      config: settings (``redis_url``, ``websocket_secret``, streams, prefixes).
      host: where to listen (default: from ``websocket_url``).
      port: where to listen (default: from ``websocket_url``; 0 picks a free port).
      instance_id: unique name of this instance (default: random).
      serve_rpc: run the Streams consumer in this instance.
      presence_ttl: seconds a connection stays "online" without a heartbeat.
      send_queue: frames buffered per connection before it counts as too slow.
      max_frame: largest frame a browser may send (bytes).
      rate: messages per second a browser may send (token bucket refill).
      burst: messages a browser may send at once (token bucket size).
      delivery_timeout: seconds to wait for sockets (and other instances) to take a frame.
      bridge_timeout: seconds a browser request waits for Django.
      rpc_concurrency: handler threads of the Streams consumer.
      auth_timeout: seconds a socket without a token has to log in the django-ipc way.
      jwt_audience: when set, tokens must carry this ``aud``.
      jwt_issuer: when set, tokens must carry this ``iss``.
    """

    def __init__(
        self,
        config: WebSocketRPCConfig | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        instance_id: str | None = None,
        serve_rpc: bool = True,
        presence_ttl: int = 30,
        send_queue: int = 256,
        max_frame: int = 65536,
        rate: float = 20.0,
        burst: int = 40,
        delivery_timeout: float = 2.0,
        bridge_timeout: float = 30.0,
        rpc_concurrency: int = 16,
        auth_timeout: float = AUTH_TIMEOUT,
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
    ) -> None:
        self.config = config or get_config()
        if self.config.websocket_secret is None:
            raise RPCConfigurationError(
                "the WebSocket server needs websocket_secret (WEBSOCKET_RPC_WEBSOCKET_SECRET)"
            )
        url = urlsplit(self.config.websocket_url)
        self.host = host or url.hostname or "127.0.0.1"
        self.port = port if port is not None else (url.port or 8765)
        self.instance_id = instance_id or f"ws-{uuid.uuid4().hex[:8]}"
        self.serve_rpc = serve_rpc
        self.presence_ttl = presence_ttl
        self.send_queue = send_queue
        self.max_frame = max_frame
        self.rate = rate
        self.burst = burst
        self.delivery_timeout = delivery_timeout
        self.bridge_timeout = bridge_timeout
        self.rpc_concurrency = rpc_concurrency
        self.auth_timeout = auth_timeout
        self.jwt_audience = jwt_audience
        self.jwt_issuer = jwt_issuer
        self.counters: Counter[str] = Counter()
        self._store: AsyncWSStore | None = None
        self._fanout: Fanout | None = None
        self._bridge: Bridge | None = None
        self._ipc: IpcDialect | None = None
        self._stop: asyncio.Event | None = None
        self.bound_port: int | None = None

    @property
    def store(self) -> AsyncWSStore:
        """The shared state in Redis (while serving)."""
        assert self._store is not None, "server is not running"
        return self._store

    @property
    def fanout(self) -> Fanout:
        """This instance's sockets and cross-instance delivery (while serving)."""
        assert self._fanout is not None, "server is not running"
        return self._fanout

    # -- authentication & HTTP -----------------------------------------------------------------

    def authenticate(self, request: Any) -> TokenClaims:
        """Verify the token from ``?token=`` or ``Authorization: Bearer``."""
        token = parse_qs(urlsplit(request.path).query).get("token", [None])[0]
        header = request.headers.get("Authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
        return self.verify(token)

    def verify(self, token: str | None) -> TokenClaims:
        """Check a JWT with this server's secret, audience and issuer."""
        secret = self.config.websocket_secret
        return verify_token(
            token,
            secret.get_secret_value() if secret else None,
            audience=self.jwt_audience,
            issuer=self.jwt_issuer,
        )

    def _process_request(self, connection: Any, request: Any) -> Any:
        """The HTTP side: a WebSocket upgrade on any path goes on to the handshake (django-ipc's
        clients use ``/`` or ``/ws``); otherwise ``GET`` (or ``HEAD``, headers only) of the demo
        page, ``/healthz`` and ``/health`` (JSON), ``404`` elsewhere, ``405`` (with ``Allow``)
        for other methods."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = urlsplit(request.path).path
        method = getattr(request, "method", "GET")  # websockets < 14 parses GET only
        allowed = "GET" if path == "/ws" else "GET, HEAD"
        if method not in allowed.split(", "):
            response = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed\n")
            response.headers["Allow"] = allowed
            return response
        if path in ("/", "/demo", "/index.html"):
            html = resources.files(__package__ or "rpc_tasks.websocket").joinpath("static/demo.html")
            response = _typed(
                connection.respond(HTTPStatus.OK, html.read_text(encoding="utf-8")), "text/html"
            )
        elif path == "/healthz":
            response = connection.respond(HTTPStatus.OK, "ok\n")
        elif path == "/health":
            body = _health(self.instance_id, self._fanout)
            response = _typed(connection.respond(HTTPStatus.OK, body), "application/json")
        elif path != "/ws":
            response = connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        else:
            return None
        if method == "HEAD":  # same headers (Content-Length included), no body
            response = dataclasses.replace(response, body=b"")
        return response

    # -- sockets -------------------------------------------------------------------------------

    async def _handler(self, ws: Any) -> None:
        ipc = not brings_token(ws.request)
        if ipc:
            claims = await first_frame_login(ws, self.verify, self.auth_timeout)
            if claims is None:
                self.counters["refused"] += 1
                return
        else:
            try:
                claims = self.authenticate(ws.request)
            except TokenError as exc:
                self.counters["refused"] += 1
                await ws.close(frames.CLOSE_UNAUTHORIZED, f"unauthorized: {exc.reason}")
                return
        info = ConnectionInfo(
            connection_id=uuid.uuid4().hex, user_id=claims.user_id, instance_id=self.instance_id
        )
        conn = Connection(
            ws,
            info,
            send_queue=self.send_queue,
            burst=self.burst,
            counters=self.counters,
            translate=to_ipc if ipc else None,
        )
        self.fanout.add(conn)
        self.counters["connected"] += 1
        metrics.emit("ws_connection", instance=self.instance_id, delta=1)
        writer = asyncio.create_task(conn.write_loop())
        try:
            await self.store.register(conn.id, conn.user_id, info.model_dump_json().encode())
            if ipc:
                from .. import __version__

                conn.offer(auth_frame(__version__))
            else:
                welcome = {"connection_id": conn.id, "user_id": conn.user_id, "instance_id": self.instance_id}
                conn.offer(frames.frame("welcome", welcome))
            async for message in ws:
                self._on_message(conn, message)
        except Exception as exc:  # ConnectionClosed and friends
            if not type(exc).__name__.startswith("ConnectionClosed"):
                logger.warning("socket %s failed: %s", conn.id, exc)
        finally:
            conn.closing = True
            writer.cancel()
            self.fanout.remove(conn)
            metrics.emit("ws_connection", instance=self.instance_id, delta=-1)
            try:
                await self.store.unregister(conn.id, conn.user_id)
            except RPCException:
                logger.warning("could not unregister %s", conn.id)

    def _on_message(self, conn: Connection, message: Any) -> None:
        retry_after = conn.take_token(self.rate, self.burst)
        if retry_after is not None:
            self.counters["rate_limited"] += 1
            metrics.emit("ws_rate_limited", instance=self.instance_id)
            conn.error(None, RPCErrorCode.RATE_LIMIT_EXCEEDED, "too many messages", retry_after)
            return
        if conn.translate is not None and self._ipc is not None:
            self._ipc.on_message(conn, message)
            return
        obj = frames.parse(message)
        if isinstance(obj, str):
            conn.error(None, RPCErrorCode.INVALID_REQUEST, obj)
            return
        kind, frame_id = obj.get("type"), obj.get("id") if isinstance(obj.get("id"), str) else None
        if kind == "ping":
            conn.offer(frames.frame("pong", {}, frame_id))
        elif kind == "request":
            if self._bridge is None:
                conn.error(frame_id, RPCErrorCode.METHOD_NOT_FOUND, "the bridge to Django is disabled")
            elif conn.bridge_in_flight >= MAX_IN_FLIGHT:
                conn.error(frame_id, RPCErrorCode.RATE_LIMIT_EXCEEDED, "too many requests in flight", 1.0)
            else:
                conn.bridge_in_flight += 1
                asyncio.get_running_loop().create_task(self._bridge.handle(conn, frame_id, obj))
        else:
            conn.error(frame_id, RPCErrorCode.INVALID_REQUEST, f"unknown frame type {kind!r}")

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event | None = None, started: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set."""
        from websockets.asyncio.server import serve

        self._stop = stop or asyncio.Event()
        store = self._store = AsyncWSStore.from_config(self.config, ttl=self.presence_ttl)
        fanout = self._fanout = Fanout(
            store,
            instance_id=self.instance_id,
            broadcast_channel=self.config.broadcast_channel,
            delivery_timeout=self.delivery_timeout,
            counters=self.counters,
        )
        self._bridge = Bridge(self.config, store, self.bridge_timeout) if self.config.enable_bridge else None
        self._ipc = IpcDialect(store, self._bridge)
        listening = asyncio.Event()
        tasks = [
            asyncio.create_task(fanout.listen(listening)),
            asyncio.create_task(fanout.heartbeat(self.presence_ttl)),
        ]
        rpc: Any = None
        try:
            await asyncio.wait_for(listening.wait(), 10)
            if self.serve_rpc:
                rpc = ServerMethods(store, fanout, self.counters).rpc_server(
                    self.config,
                    consumer_name=f"{self.instance_id}-rpc",
                    concurrency=self.rpc_concurrency,
                    call_timeout=self.delivery_timeout * 3 + 10,
                )
                rpc.start()
            async with serve(
                self._handler,
                self.host,
                self.port,
                process_request=self._process_request,
                logger=wire_logger,
                max_size=self.max_frame,
                ping_interval=20,
                ping_timeout=20,
            ) as server:
                self.bound_port = next(iter(server.sockets)).getsockname()[1]
                logger.info(
                    "WebSocket server %s on ws://%s:%d/ws", self.instance_id, self.host, self.bound_port
                )
                if started is not None:
                    started.set()
                await self._stop.wait()
                for conn in list(fanout.conns.values()):
                    await conn.ws.close(1001, "server shutting down")
        finally:  # also when start-up fails (Redis unreachable, port in use)
            if rpc is not None:
                await asyncio.get_running_loop().run_in_executor(None, rpc.stop, 30.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.client.aclose()

    def run_forever(self) -> None:
        """Run with SIGINT/SIGTERM handlers (used by ``rpc-tasks ws``)."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.serve(stop)

        asyncio.run(main())


def _typed(response: Any, content_type: str) -> Any:
    """``response`` with its ``Content-Type`` replaced (``respond`` writes text/plain)."""
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = f"{content_type}; charset=utf-8"
    return response


def _health(instance_id: str, fanout: Fanout | None) -> str:
    """``GET /health``: JSON like django-ipc's health endpoint (this instance's sockets)."""
    conns = list(fanout.conns.values()) if fanout is not None else []
    users = len({c.user_id for c in conns})
    body = {"status": "ok", "server_id": instance_id, "connections": len(conns), "users": users}
    return json.dumps(body | {"authenticated": len(conns)})
