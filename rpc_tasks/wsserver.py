"""The reference WebSocket server: browsers connect here; Django reaches them over Redis.

``rpc-tasks ws --host 127.0.0.1 --port 8765`` starts it (needs ``pip install rpc-tasks[websocket]``
and ``websocket_secret`` in the config). It

* authenticates each socket with a signed token (:mod:`rpc_tasks.auth`, ``?token=...`` or an
  ``Authorization: Bearer`` header); a missing, forged or expired token is refused with close
  code **4401** and the reason;
* hosts the Streams consumer (:class:`~rpc_tasks.server.RPCServer`) with the methods
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

Frames to browsers are JSON ``{"type", "id", "payload", "timestamp"}``; ``type`` is one of
``welcome``, ``notification``, ``broadcast``, ``response``, ``error``, ``pong``.
Frames from browsers: ``{"type": "ping"}`` or
``{"type": "request", "id": "...", "method": "...", "params": {...}}`` (the bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

from . import protocol
from .auth import TokenClaims, TokenError, verify_token
from .config import WebSocketRPCConfig, get_config
from .exceptions import RPCConfigurationError, RPCException, RPCRemoteError
from .models.broadcast import BroadcastRequest, BroadcastResponse, BroadcastTarget
from .models.connections import ConnectionInfo
from .models.errors import RPCError, RPCErrorCode, UserNotConnectedError
from .models.notifications import (
    BatchNotificationRequest,
    BatchNotificationResponse,
    NotificationRequest,
    NotificationResponse,
)
from .redis_io import AsyncWSStore

logger = logging.getLogger("rpc_tasks.ws")

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4008
ROOM_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"


class RoomRequest(BaseModel):
    """``join_room`` / ``leave_room`` params."""

    user_id: str = Field(min_length=1, max_length=256)
    room: str = Field(pattern=ROOM_PATTERN)


class RoomResponse(BaseModel):
    """Room membership after the change."""

    room: str
    user_id: str
    members: int


class PresenceQuery(BaseModel):
    """``get_presence`` params."""

    user_id: str = Field(min_length=1, max_length=256)


class PresenceResponse(BaseModel):
    """A user's live connections, on any instance."""

    user_id: str
    connected: bool
    connections: list[ConnectionInfo] = Field(default_factory=list)


class BridgeParams(BaseModel):
    """Params a Django-side bridge handler receives: the *authenticated* user and connection,
    and what the browser sent (``data``, untrusted)."""

    user_id: str
    connection_id: str
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass
class _Conn:
    id: str
    user_id: str
    ws: Any
    info: ConnectionInfo
    queue: asyncio.Queue[tuple[str, asyncio.Future[bool] | None]]
    tokens: float
    last: float = field(default_factory=time.monotonic)
    bridge_in_flight: int = 0
    closing: bool = False


class WebSocketServer:
    """One instance of the WebSocket server (run several behind one Redis to scale out).

    Parameters:
      config: settings (``redis_url``, ``websocket_secret``, streams, prefixes).
      host / port: where to listen (default: from ``websocket_url``).
      instance_id: unique name of this instance (default: random).
      serve_rpc: run the Streams consumer in this instance.
      presence_ttl: seconds a connection stays "online" without a heartbeat.
      send_queue: frames buffered per connection before it counts as too slow.
      max_frame: largest frame a browser may send (bytes).
      rate / burst: messages per second a browser may send (token bucket).
      delivery_timeout: seconds to wait for sockets (and other instances) to take a frame.
      bridge_timeout: seconds a browser request waits for Django.
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
        self.counters: Counter[str] = Counter()
        self._conns: dict[str, _Conn] = {}
        self._by_user: dict[str, set[str]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: AsyncWSStore | None = None
        self._stop: asyncio.Event | None = None
        self._resync = asyncio.Event()  # set: refresh presence now (Redis came back)
        self.bound_port: int | None = None

    @property
    def store(self) -> AsyncWSStore:
        assert self._store is not None, "server is not running"
        return self._store

    # -- authentication & HTTP -----------------------------------------------------------------

    def authenticate(self, request: Any) -> TokenClaims:
        """Verify the token from ``?token=`` or ``Authorization: Bearer``."""
        token = parse_qs(urlsplit(request.path).query).get("token", [None])[0]
        header = request.headers.get("Authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
        secret = self.config.websocket_secret
        return verify_token(token, secret.get_secret_value() if secret else None)

    def _process_request(self, connection: Any, request: Any) -> Any:
        path = urlsplit(request.path).path
        if path in ("/", "/demo", "/index.html"):
            html = resources.files("rpc_tasks").joinpath("static/demo.html").read_text(encoding="utf-8")
            response = connection.respond(HTTPStatus.OK, html)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    # -- sockets -------------------------------------------------------------------------------

    async def _handler(self, ws: Any) -> None:
        try:
            claims = self.authenticate(ws.request)
        except TokenError as exc:
            self.counters["refused"] += 1
            await ws.close(CLOSE_UNAUTHORIZED, f"unauthorized: {exc.reason}")
            return
        conn_id = uuid.uuid4().hex
        info = ConnectionInfo(connection_id=conn_id, user_id=claims.user_id, instance_id=self.instance_id)
        conn = _Conn(
            conn_id, claims.user_id, ws, info, asyncio.Queue(maxsize=self.send_queue), float(self.burst)
        )
        self._conns[conn_id] = conn
        self._by_user[claims.user_id].add(conn_id)
        self.counters["connected"] += 1
        writer = asyncio.create_task(self._writer(conn))
        try:
            await self.store.register(conn_id, claims.user_id, info.model_dump_json().encode())
            self._offer(
                conn,
                protocol.ws_frame(
                    "welcome",
                    {"connection_id": conn_id, "user_id": claims.user_id, "instance_id": self.instance_id},
                ),
            )
            async for message in ws:
                await self._on_message(conn, message)
        except Exception as exc:  # ConnectionClosed and friends
            if not type(exc).__name__.startswith("ConnectionClosed"):
                logger.warning("socket %s failed: %s", conn_id, exc)
        finally:
            conn.closing = True
            writer.cancel()
            self._conns.pop(conn_id, None)
            self._by_user[claims.user_id].discard(conn_id)
            if not self._by_user[claims.user_id]:
                self._by_user.pop(claims.user_id, None)
            try:
                await self.store.unregister(conn_id, claims.user_id)
            except RPCException:
                logger.warning("could not unregister %s", conn_id)

    async def _writer(self, conn: _Conn) -> None:
        while True:
            frame, done = await conn.queue.get()
            try:
                await conn.ws.send(frame)
                ok = True
            except Exception:
                ok = False
            if done is not None and not done.done():
                done.set_result(ok)
            if not ok:
                return

    def _offer(self, conn: _Conn, frame: str, wait: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``frame`` for ``conn``; a full queue disconnects the (too slow) reader."""
        if conn.closing:
            return None
        done: asyncio.Future[bool] | None = asyncio.get_running_loop().create_future() if wait else None
        try:
            conn.queue.put_nowait((frame, done))
        except asyncio.QueueFull:
            conn.closing = True
            self.counters["slow_disconnected"] += 1
            logger.warning("connection %s of user %s reads too slowly; disconnecting", conn.id, conn.user_id)
            asyncio.get_running_loop().create_task(conn.ws.close(CLOSE_TOO_SLOW, "send queue full"))
            return None
        return done

    async def _on_message(self, conn: _Conn, message: Any) -> None:
        now = time.monotonic()
        conn.tokens = min(float(self.burst), conn.tokens + (now - conn.last) * self.rate)
        conn.last = now
        if conn.tokens < 1.0:
            self.counters["rate_limited"] += 1
            retry_after = round((1.0 - conn.tokens) / self.rate, 3)
            self._offer(
                conn,
                protocol.ws_frame(
                    "error",
                    {
                        "code": RPCErrorCode.RATE_LIMIT_EXCEEDED.value,
                        "message": "too many messages",
                        "retry_after": retry_after,
                    },
                ),
            )
            return
        conn.tokens -= 1.0
        if not isinstance(message, str):
            self._error(conn, None, RPCErrorCode.INVALID_REQUEST, "send JSON text frames")
            return
        try:
            obj = json.loads(message)
        except ValueError:
            self._error(conn, None, RPCErrorCode.INVALID_REQUEST, "frame is not JSON")
            return
        if not isinstance(obj, dict):
            self._error(conn, None, RPCErrorCode.INVALID_REQUEST, "frame must be a JSON object")
            return
        kind, frame_id = obj.get("type"), obj.get("id") if isinstance(obj.get("id"), str) else None
        if kind == "ping":
            self._offer(conn, protocol.ws_frame("pong", {}, frame_id))
        elif kind == "request":
            if not self.config.enable_bridge:
                self._error(conn, frame_id, RPCErrorCode.METHOD_NOT_FOUND, "the bridge to Django is disabled")
            elif conn.bridge_in_flight >= 8:
                self._error(
                    conn,
                    frame_id,
                    RPCErrorCode.RATE_LIMIT_EXCEEDED,
                    "too many requests in flight",
                    retry_after=1.0,
                )
            else:
                conn.bridge_in_flight += 1
                asyncio.get_running_loop().create_task(self._bridge(conn, frame_id, obj))
        else:
            self._error(conn, frame_id, RPCErrorCode.INVALID_REQUEST, f"unknown frame type {kind!r}")

    def _error(
        self,
        conn: _Conn,
        frame_id: str | None,
        code: RPCErrorCode,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        payload: dict[str, Any] = {"code": code.value, "message": message}
        if retry_after is not None:
            payload["retry_after"] = retry_after
        self._offer(conn, protocol.ws_frame("error", payload, frame_id))

    async def _bridge(self, conn: _Conn, frame_id: str | None, obj: dict[str, Any]) -> None:
        try:
            method, data = obj.get("method"), obj.get("params", {})
            if not isinstance(method, str) or not protocol.METHOD_NAME_RE.fullmatch(method):
                self._error(
                    conn, frame_id, RPCErrorCode.INVALID_REQUEST, "method must match ^[a-zA-Z0-9_.]+$"
                )
                return
            if not isinstance(data, dict):
                self._error(conn, frame_id, RPCErrorCode.INVALID_REQUEST, "params must be an object")
                return
            correlation_id = str(uuid.uuid4())
            reply_to = protocol.reply_key(self.config.response_key_prefix, correlation_id)
            params = BridgeParams(user_id=conn.user_id, connection_id=conn.id, data=data)
            try:
                payload = protocol.encode_request(
                    method,
                    params,
                    reply_to=reply_to,
                    timeout=protocol.wire_timeout(self.bridge_timeout),
                    correlation_id=correlation_id,
                    extensions={protocol.ERROR_DETAILS_EXTENSION},
                    max_bytes=self.config.max_payload_bytes,
                )
            except (ValueError, RPCException) as exc:
                self._error(conn, frame_id, RPCErrorCode.INVALID_REQUEST, str(exc))
                return
            await self.store.add_request(self.config.bridge_stream, payload, self.config.stream_maxlen)
            raw = await self.store.wait_reply(reply_to, self.bridge_timeout)
            if raw is None:
                self._error(conn, frame_id, RPCErrorCode.TIMEOUT, "Django did not answer in time")
                return
            response = protocol.decode_response(raw, max_bytes=self.config.max_payload_bytes)
            if response.success:
                self._offer(
                    conn,
                    protocol.ws_frame("response", {"method": method, "result": response.result}, frame_id),
                )
            else:
                err = response.error or RPCError(message="failed")
                self._error(conn, frame_id, err.code, err.message, err.retry_after)
        except RPCException as exc:
            self._error(conn, frame_id, RPCErrorCode.SERVICE_UNAVAILABLE, f"bridge unavailable: {exc}")
        finally:
            conn.bridge_in_flight -= 1

    # -- local delivery ------------------------------------------------------------------------

    async def _deliver(self, conn_ids: list[str], frame: str) -> int:
        waits = [
            f
            for f in (self._offer(self._conns[c], frame, wait=True) for c in conn_ids if c in self._conns)
            if f is not None
        ]
        if not waits:
            return 0
        done, _ = await asyncio.wait(waits, timeout=self.delivery_timeout)
        return sum(1 for f in done if f.result())

    def _local_conns_of(
        self, users: set[str] | None, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[str]:
        if users is None:
            return [c.id for c in self._conns.values() if c.user_id not in exclude]
        return [cid for u in users if u not in exclude for cid in self._by_user.get(u, ())]

    async def _deliver_broadcast_local(self, req: BroadcastRequest) -> tuple[int, int]:
        frame = protocol.ws_frame(
            "broadcast",
            {
                "event_type": req.event_type,
                "payload": req.payload,
                "target": req.target.value,
                "room": req.room,
            },
        )
        exclude = set(req.exclude_user_ids)
        users: set[str] | None
        if req.target is BroadcastTarget.ALL:
            users = None
        elif req.target is BroadcastTarget.ROOM:
            users = await self.store.room_members(req.room or "")
        else:
            users = set(req.user_ids)
        conn_ids = self._local_conns_of(users, exclude)
        sockets = await self._deliver(conn_ids, frame)
        reached = {self._conns[c].user_id for c in conn_ids if c in self._conns}
        return sockets, len(reached)

    # -- pub/sub -------------------------------------------------------------------------------

    async def _listen(self, ready: asyncio.Event) -> None:
        """Subscribe to this instance's channel and the broadcast channel. A Redis failure
        (restart, network) ends the subscription: subscribe again on a new connection, with
        backoff, instead of letting this task die (which silently stopped broadcasts and
        cross-instance delivery for the rest of the process's life)."""
        backoff = 0.1
        lost = False
        while True:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(
                    protocol.ws_instance_channel(self.instance_id), self.config.broadcast_channel
                )
                if lost:
                    logger.warning("Pub/Sub subscription restored")
                    self._resync.set()  # Redis may have restarted empty: re-register presence now
                lost, backoff = False, 0.1
                ready.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    asyncio.get_running_loop().create_task(self._on_pubsub(message))
            except (RedisError, OSError) as exc:
                if not lost:
                    logger.warning("Pub/Sub connection lost (%s); resubscribing", exc)
                lost = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _on_pubsub(self, message: dict[str, Any]) -> None:
        try:
            channel = (
                message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            )
            obj = json.loads(message["data"])
            if channel == self.config.broadcast_channel:
                ack = None
                if isinstance(obj, dict) and "broadcast" in obj and "ack" in obj:
                    ack, obj = obj["ack"], obj["broadcast"]
                req = BroadcastRequest.model_validate(obj)
                sockets, users = await self._deliver_broadcast_local(req)
                self.counters["broadcasts"] += 1
                if ack:
                    await self.store.ack(ack, sockets * 1_000_000 + users)
            elif obj.get("op") == "user":
                sockets = await self._deliver(self._local_conns_of({obj["user_id"]}), obj["frame"])
                await self.store.ack(obj["ack"], sockets)
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            logger.warning("ignoring malformed Pub/Sub message: %s", exc)
        except RPCException as exc:
            logger.warning("could not handle Pub/Sub message: %s", exc)

    # -- RPC methods ---------------------------------------------------------------------------

    async def _deliver_to_user(self, user_id: str, frame: str) -> tuple[int, int]:
        """Deliver on every instance; returns ``(connections, sockets_that_took_it)``."""
        records = [ConnectionInfo.model_validate_json(r) for r in await self.store.user_connections(user_id)]
        local = [r.connection_id for r in records if r.instance_id == self.instance_id]
        remote = {r.instance_id for r in records if r.instance_id and r.instance_id != self.instance_id}
        took = await self._deliver(local, frame) if local else 0
        if remote:
            ack = protocol.ws_ack_key(uuid.uuid4().hex)
            expected = 0
            for instance in remote:
                message = json.dumps({"op": "user", "user_id": user_id, "frame": frame, "ack": ack})
                expected += min(1, await self.store.publish(protocol.ws_instance_channel(instance), message))
            took += sum(await self.store.collect_acks(ack, expected, self.delivery_timeout + 1))
        return len(records), took

    async def send_notification(self, req: NotificationRequest) -> NotificationResponse:
        """Deliver a notification to every socket of the user, on any instance."""
        notification_id = str(uuid.uuid4())
        frame = protocol.ws_frame(
            "notification", req.model_dump(mode="json", exclude={"require_connected"}), notification_id
        )
        connections, took = await self._deliver_to_user(req.user_id, frame)
        if connections == 0 and req.require_connected:
            raise RPCRemoteError(
                UserNotConnectedError(message=f"user {req.user_id!r} is not connected", user_id=req.user_id)
            )
        self.counters["notifications"] += 1
        return NotificationResponse(
            delivered=took > 0,
            user_connected=connections > 0,
            connection_count=connections,
            notification_id=notification_id,
        )

    async def send_batch(self, req: BatchNotificationRequest) -> BatchNotificationResponse:
        """Deliver one notification to several users."""
        delivered: list[str] = []
        offline: list[str] = []
        for user_id in dict.fromkeys(req.user_ids):
            single = NotificationRequest(
                user_id=user_id,
                notification_type=req.notification_type,
                title=req.title,
                message=req.message,
                priority=req.priority,
                data=req.data,
            )
            result = await self.send_notification(single)
            (delivered if result.delivered else offline).append(user_id)
        return BatchNotificationResponse(
            total=len(delivered) + len(offline),
            delivered=len(delivered),
            failed=len(offline),
            delivered_user_ids=delivered,
            offline_user_ids=offline,
        )

    async def broadcast(self, req: BroadcastRequest) -> BroadcastResponse:
        """Broadcast through every instance and count the sockets and users reached."""
        ack = protocol.ws_ack_key(uuid.uuid4().hex)
        envelope = json.dumps({"broadcast": req.model_dump(mode="json"), "ack": ack})
        instances = await self.store.publish(self.config.broadcast_channel, envelope)
        acks = await self.store.collect_acks(ack, instances, self.delivery_timeout + 1)
        return BroadcastResponse(
            recipients=sum(a // 1_000_000 for a in acks), users=sum(a % 1_000_000 for a in acks)
        )

    async def join_room(self, req: RoomRequest) -> RoomResponse:
        """Add a user to a room (all their sockets, on every instance)."""
        return RoomResponse(
            room=req.room, user_id=req.user_id, members=await self.store.room_join(req.room, req.user_id)
        )

    async def leave_room(self, req: RoomRequest) -> RoomResponse:
        """Remove a user from a room."""
        return RoomResponse(
            room=req.room, user_id=req.user_id, members=await self.store.room_leave(req.room, req.user_id)
        )

    async def get_presence(self, req: PresenceQuery) -> PresenceResponse:
        """A user's live connections (from Redis presence, all instances)."""
        records = [
            ConnectionInfo.model_validate_json(r) for r in await self.store.user_connections(req.user_id)
        ]
        return PresenceResponse(user_id=req.user_id, connected=bool(records), connections=records)

    def _rpc_server(self) -> Any:
        from .server import RPCServer

        server = RPCServer(
            self.config, consumer_name=f"{self.instance_id}-rpc", concurrency=self.rpc_concurrency
        )
        methods: list[tuple[str, Any, type[BaseModel], type[BaseModel]]] = [
            ("send_notification", self.send_notification, NotificationRequest, NotificationResponse),
            (
                "send_batch_notifications",
                self.send_batch,
                BatchNotificationRequest,
                BatchNotificationResponse,
            ),
            ("broadcast", self.broadcast, BroadcastRequest, BroadcastResponse),
            ("join_room", self.join_room, RoomRequest, RoomResponse),
            ("leave_room", self.leave_room, RoomRequest, RoomResponse),
            ("get_presence", self.get_presence, PresenceQuery, PresenceResponse),
        ]
        for name, coro_fn, params_model, result_model in methods:
            server.register(
                name, self._in_loop(coro_fn), params_model=params_model, result_model=result_model
            )
        return server

    def _in_loop(self, coro_fn: Any) -> Any:
        def run(params: Any) -> Any:
            assert self._loop is not None
            future = asyncio.run_coroutine_threadsafe(coro_fn(params), self._loop)
            return future.result(timeout=self.delivery_timeout * 3 + 10)

        return run

    # -- lifecycle -----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        period = max(0.2, self.presence_ttl / 3)
        retry = 0.5
        while True:
            records = []
            for conn in list(self._conns.values()):
                conn.info.last_seen = datetime.now(timezone.utc)
                records.append((conn.id, conn.user_id, conn.info.model_dump_json().encode()))
            try:
                await self.store.refresh(self.instance_id, records)
                wait, retry = period, 0.5
            except RPCException as exc:
                # Retry sooner than a full period: after a Redis restart (no presence left)
                # users would look offline until the next successful refresh.
                logger.warning("presence heartbeat failed: %s", exc)
                wait, retry = min(retry, period), min(retry * 2, period)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resync.wait(), wait)
            self._resync.clear()

    async def serve(self, stop: asyncio.Event | None = None, started: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = stop or asyncio.Event()
        self._resync = asyncio.Event()  # bound to this run's loop (a server may be served again)
        self._store = AsyncWSStore.from_config(self.config, ttl=self.presence_ttl)
        listening = asyncio.Event()
        tasks = [asyncio.create_task(self._listen(listening)), asyncio.create_task(self._heartbeat())]
        rpc: Any = None
        try:
            await asyncio.wait_for(listening.wait(), 10)
            if self.serve_rpc:
                rpc = self._rpc_server()
                rpc.start()
            async with serve(
                self._handler,
                self.host,
                self.port,
                process_request=self._process_request,
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
                for conn in list(self._conns.values()):
                    await conn.ws.close(1001, "server shutting down")
        finally:  # also when start-up fails (Redis unreachable, port in use)
            if rpc is not None:
                await asyncio.get_running_loop().run_in_executor(None, rpc.stop, 30.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.store.client.aclose()

    def run_forever(self) -> None:
        """Run with SIGINT/SIGTERM handlers (used by ``rpc-tasks ws``)."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.serve(stop)

        asyncio.run(main())
