"""Configuration: :class:`WebSocketRPCConfig`, the one place where settings are defined.

Sources, in order of precedence for :func:`get_config`:

1. an explicit config passed to the API (``setup_broker(config=...)``, ``RPCReplies(config=...)``);
2. Django's ``WEBSOCKET_RPC`` setting when Django is configured and the setting is present;
3. environment variables ``WEBSOCKET_RPC_<FIELD>`` (e.g. ``WEBSOCKET_RPC_REDIS_URL``), with
   ``REDIS_URL`` accepted as a fallback for ``redis_url``;
4. the defaults below (those of the seed design).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)

from .exceptions import RPCConfigurationError

ENV_PREFIX = "WEBSOCKET_RPC_"
_LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}
#: Plain schemes, then Sentinel and Cluster (``rpc_tasks.redis.topology``, issue 18).
_REDIS_SCHEMES = {
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
}
_WS_SCHEMES = {"ws", "wss"}


_SECRET_QUERY_RE = re.compile(r"(?i)((?:^|&)(?:password|passwd|pass|secret|token|sentinel_password)=)[^&]*")


def redact_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        if ":" in userinfo:
            netloc = f"{user}:***@{hostport}"
    query = _SECRET_QUERY_RE.sub(r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


class WebSocketRPCConfig(BaseModel):
    """Settings for the RPC client, the reply path of ``@rpc_actor`` and the stream server.

    Field names and defaults follow the seed design; ``max_payload_bytes``,
    ``redis_pool_timeout``, ``log_rpc_params``, ``announce_extensions``, ``websocket_secret`` and
    ``broadcast_channel`` are additions.
    Timeouts are seconds and may be fractional.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True
    )

    # Module settings
    enabled: bool = False
    module_name: str = Field(default="websocket_rpc", min_length=1)

    # Redis settings
    redis_url: str = "redis://localhost:6379/2"
    redis_max_connections: int = Field(default=50, ge=1, le=100_000)
    redis_pool_timeout: float = Field(
        default=10.0, gt=0, description="seconds a caller waits for a free pooled connection"
    )

    # RPC settings
    rpc_timeout: float = Field(default=30, gt=0, le=3600)
    request_stream: str = Field(default="stream:requests", min_length=1)
    consumer_group: str = Field(default="rpc_group", min_length=1)
    stream_maxlen: int = Field(default=10000, ge=1)

    # Response settings
    response_key_prefix: str = Field(default="list:response:", min_length=1, max_length=256)
    response_key_ttl: int = Field(default=60, ge=1)

    # Bridge listener settings
    enable_bridge: bool = False
    bridge_consumer_name: str = Field(default="django_bridge", min_length=1)
    bridge_stream: str = Field(default="stream:django:requests", min_length=1)

    # WebSocket server settings
    websocket_url: str = "ws://localhost:8765"
    websocket_secret: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="HMAC secret for connection tokens (needed by the WebSocket server); never empty",
    )
    broadcast_channel: str = Field(
        default="notifications:broadcast", min_length=1, description="Pub/Sub channel the servers listen on"
    )

    # Logging settings
    log_rpc_calls: bool = False
    log_level: str = "INFO"
    log_rpc_params: bool = Field(
        default=False, description="with log_rpc_calls, also log params (they may hold secrets)"
    )

    # Protocol
    announce_extensions: bool = Field(
        default=True,
        description="list understood extensions in requests; turn off for servers that reject unknown keys",
    )

    # Limits
    max_payload_bytes: int = Field(default=1_048_576, ge=1024, description="largest encoded envelope")

    # Reliability
    send_retry_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="how long .send() keeps retrying an enqueue while the broker is unreachable "
        "(.call() never retries: it fails at once with RPCConnectionError)",
    )
    idempotency_ttl: int = Field(
        default=86_400, ge=1, description="seconds an idempotent actor's result is kept against redelivery"
    )
    idempotency_wait: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="seconds a duplicate of an idempotent message waits for the run in progress",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _REDIS_SCHEMES:
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// "
                "(e.g. redis://localhost:6379/0)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host (e.g. redis://localhost:6379/0)")
        return value

    @field_validator("websocket_url")
    @classmethod
    def _check_ws_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _WS_SCHEMES or not parts.hostname:
            raise ValueError(f"websocket_url must be ws://host[:port] or wss://... (got {value!r})")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {sorted(_LOG_LEVELS)}")
        return upper

    @field_serializer("websocket_secret", when_used="json")
    def _dump_secret(self, value: SecretStr | None) -> str | None:
        # to_django_settings() must round-trip; repr() and redacted() still mask it.
        return value.get_secret_value() if value is not None else None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, source: str = "WEBSOCKET_RPC", names: Mapping[str, str] | None = None
    ) -> WebSocketRPCConfig:
        """Build from a dict (e.g. Django's ``WEBSOCKET_RPC``); raises ``RPCConfigurationError``
        naming each bad setting (as ``names`` maps field -> where it came from, else
        ``source["field"]``) with its value (secrets masked) and what is wrong."""
        lowered = {str(k).lower(): v for k, v in data.items()}
        try:
            return cls.model_validate(lowered)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else ""
                where = (names or {}).get(field) or (f"{source}[{field!r}]" if field else source)
                shown = _shown(field, lowered.get(field))
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}{'=' + shown if shown else ''}: {message}")
            raise RPCConfigurationError("invalid settings: " + "; ".join(problems)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebSocketRPCConfig:
        """Build from ``WEBSOCKET_RPC_<FIELD>`` environment variables (``REDIS_URL`` as fallback)."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        names: dict[str, str] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                data[name], names[name] = env[key], key
        if "redis_url" not in data and env.get("REDIS_URL"):
            data["redis_url"], names["redis_url"] = env["REDIS_URL"], "REDIS_URL"
        return cls.from_mapping(data, source="environment", names=names)

    # -- export -------------------------------------------------------------------------------

    def to_django_settings(self) -> dict[str, Any]:
        """Return ``{"WEBSOCKET_RPC": {...}}`` for Django settings, or ``{}`` when disabled."""
        if not self.enabled:
            return {}
        return {"WEBSOCKET_RPC": self.model_dump(mode="json")}

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets (the Redis password) masked; safe to log."""
        data = self.model_dump(mode="json")
        data["redis_url"] = redact_url(self.redis_url)
        if data.get("websocket_secret"):
            data["websocket_secret"] = "***"
        return data

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, (redact_url(value) if key == "redis_url" and isinstance(value, str) else value)

    @property
    def log_level_int(self) -> int:
        """``log_level`` as a ``logging`` level number."""
        return int(logging.getLevelName(self.log_level))


def _shown(field: str, value: Any) -> str:
    """A setting's value for an error message: URLs without their password, secrets masked."""
    if value is None:
        return ""
    if field == "websocket_secret":
        return "'***'"
    if field == "redis_url" and isinstance(value, str):
        return repr(redact_url(value))
    return repr(value)


def _django_settings() -> Mapping[str, Any] | None:
    try:
        from django.conf import settings  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        if not settings.configured:
            return None
        value = getattr(settings, "WEBSOCKET_RPC", None)
    except Exception:  # pragma: no cover - Django misconfigured; fall back to env
        return None
    return value if isinstance(value, Mapping) and value else None


def get_config() -> WebSocketRPCConfig:
    """Return the effective config: Django's ``WEBSOCKET_RPC`` if set, else the environment."""
    django_value = _django_settings()
    if django_value is not None:
        return WebSocketRPCConfig.from_mapping(django_value)
    return WebSocketRPCConfig.from_env()
