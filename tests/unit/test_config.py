"""Unit tests of WebSocketRPCConfig: seed defaults, validation, env loading, export, redaction."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from rpc_tasks.config import ENV_PREFIX, WebSocketRPCConfig, get_config, redact_url
from rpc_tasks.exceptions import RPCConfigurationError, RPCException

SEED_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "module_name": "websocket_rpc",
    "redis_url": "redis://localhost:6379/2",
    "redis_max_connections": 50,
    "rpc_timeout": 30,
    "request_stream": "stream:requests",
    "consumer_group": "rpc_group",
    "stream_maxlen": 10000,
    "response_key_prefix": "list:response:",
    "response_key_ttl": 60,
    "enable_bridge": False,
    "bridge_consumer_name": "django_bridge",
    "bridge_stream": "stream:django:requests",
    "websocket_url": "ws://localhost:8765",
    "log_rpc_calls": False,
    "log_level": "INFO",
}

SECRET = "hunter2-s3cret"


# -- defaults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "expected"), sorted(SEED_DEFAULTS.items()))
def test_seed_default(field: str, expected: Any) -> None:
    value = getattr(WebSocketRPCConfig(), field)
    assert value == expected
    if isinstance(expected, bool):
        assert value is expected


def test_from_env_with_empty_environ_gives_defaults() -> None:
    assert WebSocketRPCConfig.from_env({}) == WebSocketRPCConfig()


def test_extra_fields_are_forbidden() -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(no_such_setting=1)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379/0",
        "https://localhost",
        "localhost:6379",
        "redis://",
        "redis:///0",
        "",
        "amqp://guest:guest@localhost:5672/",
    ],
)
def test_bad_redis_url_rejected(url: str) -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(redis_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://user:pw@redis.internal:6380/3",
        "rediss://cache.example.com:6380/0",
        "rediss://:pw@cache.example.com/1",
        "unix:///var/run/redis/redis.sock",
        "unix:///tmp/redis.sock?db=2",
    ],
)
def test_good_redis_url_accepted(url: str) -> None:
    assert WebSocketRPCConfig(redis_url=url).redis_url == url


@pytest.mark.parametrize("field", ["rpc_timeout", "redis_pool_timeout"])
@pytest.mark.parametrize("value", [0, -1, -0.5])
def test_non_positive_timeouts_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(**{field: value})


def test_fractional_timeout_accepted() -> None:
    assert WebSocketRPCConfig(rpc_timeout=0.25).rpc_timeout == 0.25


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_max_connections", 0),
        ("stream_maxlen", 0),
        ("response_key_ttl", 0),
        ("response_key_ttl", -5),
        ("module_name", ""),
        ("response_key_prefix", ""),
        ("max_payload_bytes", 100),
    ],
)
def test_other_bounds_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(**{field: value})


@pytest.mark.parametrize(
    "url", ["http://localhost:8765", "localhost:8765", "ws://", "wss:///path", "redis://localhost", ""]
)
def test_bad_websocket_url_rejected(url: str) -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(websocket_url=url)


@pytest.mark.parametrize("url", ["ws://localhost:8765", "wss://ws.example.com/socket", "ws://10.0.0.5"])
def test_good_websocket_url_accepted(url: str) -> None:
    assert WebSocketRPCConfig(websocket_url=url).websocket_url == url


@pytest.mark.parametrize("level", ["VERBOSE", "", "TRACE", "info level", "5"])
def test_bad_log_level_rejected(level: str) -> None:
    with pytest.raises(ValidationError):
        WebSocketRPCConfig(log_level=level)


@pytest.mark.parametrize(
    ("level", "number"), [("debug", 10), ("Info", 20), ("WARNING", 30), ("error", 40), ("critical", 50)]
)
def test_log_level_normalised(level: str, number: int) -> None:
    config = WebSocketRPCConfig(log_level=level)
    assert config.log_level == level.upper()
    assert config.log_level_int == number


def test_assignment_is_validated() -> None:
    config = WebSocketRPCConfig()
    with pytest.raises(ValidationError):
        config.redis_url = "http://nope"
    with pytest.raises(ValidationError):
        config.rpc_timeout = 0
    assert config.redis_url == SEED_DEFAULTS["redis_url"]


# -- from_env / from_mapping -------------------------------------------------------------------


def test_from_env_reads_prefixed_vars_with_coercion() -> None:
    env = {
        "WEBSOCKET_RPC_ENABLED": "true",
        "WEBSOCKET_RPC_REDIS_URL": "redis://cache:6380/4",
        "WEBSOCKET_RPC_REDIS_MAX_CONNECTIONS": "12",
        "WEBSOCKET_RPC_RPC_TIMEOUT": "2.5",
        "WEBSOCKET_RPC_RESPONSE_KEY_TTL": "90",
        "WEBSOCKET_RPC_ENABLE_BRIDGE": "1",
        "WEBSOCKET_RPC_LOG_RPC_CALLS": "false",
        "WEBSOCKET_RPC_LOG_LEVEL": "debug",
        "WEBSOCKET_RPC_RESPONSE_KEY_PREFIX": "myapp:resp:",
        "UNRELATED": "ignored",
    }
    config = WebSocketRPCConfig.from_env(env)
    assert config.enabled is True
    assert config.redis_url == "redis://cache:6380/4"
    assert config.redis_max_connections == 12
    assert config.rpc_timeout == 2.5
    assert config.response_key_ttl == 90
    assert config.enable_bridge is True
    assert config.log_rpc_calls is False
    assert config.log_level == "DEBUG"
    assert config.response_key_prefix == "myapp:resp:"
    # untouched fields keep their defaults
    assert config.consumer_group == "rpc_group"


def test_from_env_every_field_has_an_env_var() -> None:
    env = {ENV_PREFIX + "MODULE_NAME": "custom", ENV_PREFIX + "MAX_PAYLOAD_BYTES": "2048"}
    config = WebSocketRPCConfig.from_env(env)
    assert config.module_name == "custom"
    assert config.max_payload_bytes == 2048


def test_from_env_redis_url_fallback() -> None:
    assert WebSocketRPCConfig.from_env({"REDIS_URL": "redis://fallback:6379/1"}).redis_url == (
        "redis://fallback:6379/1"
    )
    both = {"REDIS_URL": "redis://fallback:6379/1", "WEBSOCKET_RPC_REDIS_URL": "redis://primary:6379/2"}
    assert WebSocketRPCConfig.from_env(both).redis_url == "redis://primary:6379/2"
    # an empty REDIS_URL is not a fallback
    assert WebSocketRPCConfig.from_env({"REDIS_URL": ""}).redis_url == SEED_DEFAULTS["redis_url"]


@pytest.mark.parametrize(
    "env",
    [
        {"WEBSOCKET_RPC_RPC_TIMEOUT": "soon"},
        {"WEBSOCKET_RPC_RPC_TIMEOUT": "0"},
        {"WEBSOCKET_RPC_REDIS_MAX_CONNECTIONS": "many"},
        {"WEBSOCKET_RPC_ENABLED": "perhaps"},
        {"WEBSOCKET_RPC_REDIS_URL": "http://localhost:6379"},
        {"REDIS_URL": "memcached://localhost"},
        {"WEBSOCKET_RPC_LOG_LEVEL": "LOUD"},
        {"WEBSOCKET_RPC_WEBSOCKET_URL": "http://localhost:8765"},
    ],
)
def test_from_env_invalid_value_raises_configuration_error(env: dict[str, str]) -> None:
    with pytest.raises(RPCConfigurationError) as info:
        WebSocketRPCConfig.from_env(env)
    assert isinstance(info.value, RPCException)
    assert not isinstance(info.value, ValidationError)


def test_from_mapping_accepts_django_style_upper_case_keys() -> None:
    config = WebSocketRPCConfig.from_mapping(
        {"ENABLED": True, "REDIS_URL": "redis://h:1/0", "RPC_TIMEOUT": 5}
    )
    assert config.enabled is True
    assert config.redis_url == "redis://h:1/0"
    assert config.rpc_timeout == 5
    with pytest.raises(RPCConfigurationError):
        WebSocketRPCConfig.from_mapping({"NOT_A_SETTING": 1})


def test_get_config_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key == "REDIS_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("WEBSOCKET_RPC_RPC_TIMEOUT", "7")
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/5")
    config = get_config()
    assert config.rpc_timeout == 7
    assert config.redis_url == "redis://from-env:6379/5"


# -- export ------------------------------------------------------------------------------------


def test_to_django_settings_empty_when_disabled() -> None:
    assert WebSocketRPCConfig().to_django_settings() == {}
    assert WebSocketRPCConfig(enabled=False, rpc_timeout=3).to_django_settings() == {}


def test_to_django_settings_when_enabled() -> None:
    config = WebSocketRPCConfig(enabled=True, rpc_timeout=3, redis_url="redis://u:pw@h:6379/1")
    settings = config.to_django_settings()
    assert list(settings) == ["WEBSOCKET_RPC"]
    value = settings["WEBSOCKET_RPC"]
    assert set(value) == set(WebSocketRPCConfig.model_fields)
    assert value["enabled"] is True
    assert value["rpc_timeout"] == 3
    assert value["redis_url"] == "redis://u:pw@h:6379/1"  # real settings keep the real URL
    # and it loads back to the same config
    assert WebSocketRPCConfig.from_mapping(value) == config


# -- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{SECRET}@localhost:6379/0",
        f"redis://:{SECRET}@localhost:6379/0",
        f"rediss://default:{SECRET}@cache.example.com:6380/2",
        f"redis://:{SECRET}@localhost/0",
        f"unix://:{SECRET}@/var/run/redis.sock",
    ],
)
def test_repr_and_redacted_hide_password(url: str) -> None:
    config = WebSocketRPCConfig(redis_url=url)
    assert config.redis_url == url  # the real value is kept for connecting
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    redacted = config.redacted()
    assert SECRET not in str(redacted)
    assert "***" in redacted["redis_url"]
    assert set(redacted) == set(WebSocketRPCConfig.model_fields)


def test_redacted_without_password_is_unchanged() -> None:
    config = WebSocketRPCConfig(redis_url="redis://localhost:6379/3")
    assert config.redacted()["redis_url"] == "redis://localhost:6379/3"
    assert config.redacted() == config.model_dump(mode="json")


@pytest.mark.parametrize(
    "url", [f"redis://localhost:6379/0?password={SECRET}", f"unix:///tmp/redis.sock?db=0&password={SECRET}"]
)
def test_repr_hides_query_string_password(url: str) -> None:
    config = WebSocketRPCConfig(redis_url=url)
    assert SECRET not in repr(config)
    assert SECRET not in str(config.redacted())


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@localhost:6379/0", f"redis://:{SECRET}@/0"])
def test_configuration_error_does_not_leak_password(url: str) -> None:
    with pytest.raises(RPCConfigurationError) as info:
        WebSocketRPCConfig.from_env({"WEBSOCKET_RPC_REDIS_URL": url})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@host/1?ssl_cert_reqs=none", "rediss://user:***@host/1?ssl_cert_reqs=none"),
        ("redis://user:p@ss@host/0", "redis://user:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_unparsable() -> None:
    result = redact_url("redis://:pw@[::1/0")
    assert "pw" not in result


def test_redact_url_keeps_ipv6_host() -> None:
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
