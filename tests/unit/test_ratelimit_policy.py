"""Fast checks of the retry/rate-limit policy pieces (no Redis)."""

from __future__ import annotations

from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker
from pydantic import BaseModel

from rpc_tasks import (
    RPCConfigurationError,
    RPCConnectionError,
    RPCErrorCode,
    RPCRemoteError,
    RPCTimeoutError,
    WebSocketRPCConfig,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.middleware import RPCRetries, parse_rate, rate_limit_key, rpc_error_of

CONFIG = WebSocketRPCConfig(redis_url="redis://127.0.0.1:6379/9")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50/s", (50.0, 1.0)),
        ("600/m", (600.0, 60.0)),
        ("1000/h", (1000.0, 3600.0)),
        ("5/10s", (5.0, 10.0)),
        (" 2.5 / min ", (2.5, 60.0)),
        ("7/second", (7.0, 1.0)),
    ],
)
def test_parse_rate(text: str, expected: tuple[float, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "0/s", "10", "10/x", "-1/s", "10/0s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(RPCConfigurationError):
        parse_rate(text)


class Tenant(BaseModel):
    tenant_id: str


class Msg:
    def __init__(self, actor_name: str, args: tuple[Any, ...] = (), options: dict[str, Any] | None = None):
        self.actor_name = actor_name
        self.args = args
        self.options = options or {}


def _broker() -> Any:
    return setup_broker(StubBroker(), config=CONFIG, set_global=False)


def test_rate_limit_key_default_static_and_callable() -> None:
    broker = _broker()

    @rpc_actor(broker=broker, queue_name="rl_keys")
    def plain(params: Tenant) -> None: ...

    @rpc_actor(broker=broker, queue_name="rl_keys", rate_limit_key="crm")
    def static(params: Tenant) -> None: ...

    @rpc_actor(broker=broker, queue_name="rl_keys", rate_limit_key=lambda p: f"tenant:{p.tenant_id}")
    def per_tenant(params: Tenant) -> None: ...

    args = ({"tenant_id": "acme"},)
    assert rate_limit_key(plain, Msg("plain", args)) == "plain"
    assert rate_limit_key(static, Msg("static", args)) == "crm"
    assert rate_limit_key(per_tenant, Msg("per_tenant", args)) == "tenant:acme"
    # a key function that cannot work on a malformed message falls back to the actor name
    assert rate_limit_key(per_tenant, Msg("per_tenant", ({"nope": 1},))) == "per_tenant"


def test_rate_limit_option_validated_when_declared() -> None:
    broker = _broker()
    with pytest.raises(RPCConfigurationError):

        @rpc_actor(broker=broker, queue_name="rl_bad", rate_limit="lots")
        def bad(params: Tenant) -> None: ...


def test_rpc_error_of_maps_rpc_exceptions_only() -> None:
    assert rpc_error_of(KeyError("x")) is None
    err = rpc_error_of(RPCTimeoutError("m", 1.5))
    assert err is not None and err.code is RPCErrorCode.TIMEOUT and err.retryable
    err = rpc_error_of(RPCConnectionError("down"))
    assert err is not None and err.code is RPCErrorCode.SERVICE_UNAVAILABLE and err.retryable
    remote = RPCRemoteError.from_code("rate_limit_exceeded", "slow", retry_after=2)
    assert rpc_error_of(remote) is remote.error


def test_retry_codes_decide_instead_of_the_flag() -> None:
    retries = RPCRetries(retry_codes=["timeout", RPCErrorCode.USER_NOT_CONNECTED])
    down = RPCRemoteError.from_code("service_unavailable", "x").error
    offline = RPCRemoteError.from_code("user_not_connected", "x").error
    msg = Msg("a")
    assert retries.is_retryable(msg, None, down) is False
    assert retries.is_retryable(msg, None, offline) is True
    msg.options["retry_codes"] = ["service_unavailable"]
    assert retries.is_retryable(msg, None, down) is True
    default = RPCRetries()
    assert default.is_retryable(Msg("a"), None, down) is True
    assert default.is_retryable(Msg("a"), None, offline) is False


def test_delay_never_below_retry_after_and_capped_at_seven_days() -> None:
    retries = RPCRetries(min_backoff=10, max_backoff=100, jitter=0.3)
    for _ in range(200):
        assert retries.compute_delay_ms(Msg("a"), None, 3, 0.75) >= 750
    huge = retries.compute_delay_ms(Msg("a"), None, 0, 30 * 24 * 3600)
    assert huge < 7 * 24 * 3600 * 1000
