"""Errors a newcomer meets first say what to do."""

from __future__ import annotations

import pytest
from dramatiq.brokers.stub import StubBroker
from pydantic import BaseModel

from rpc_tasks import RPCConfigurationError, WebSocketRPCConfig, rpc_actor


class Params(BaseModel):
    n: int


class Result(BaseModel):
    n: int


def test_send_and_call_without_setup_broker_name_the_fix() -> None:
    broker = StubBroker()  # what an app gets when it forgot setup_broker()
    broker.emit_after("process_boot")

    @rpc_actor(broker=broker, queue_name="forgotten")
    def double(params: Params) -> Result:
        return Result(n=params.n * 2)

    for attempt in (lambda: double.send(Params(n=1)), lambda: double.call(Params(n=1), timeout=0.1)):
        with pytest.raises(RPCConfigurationError, match=r"setup_broker\(\)"):
            attempt()
    assert broker.queues["forgotten"].qsize() == 0  # nothing was enqueued


@pytest.mark.parametrize(
    "env, names",
    [
        ({"REDIS_URL": "http://user:secret@host"}, ["REDIS_URL='http://user:***@host'", "redis://"]),
        ({"WEBSOCKET_RPC_RPC_TIMEOUT": "soon"}, ["WEBSOCKET_RPC_RPC_TIMEOUT='soon'", "number"]),
        ({"WEBSOCKET_RPC_WEBSOCKET_SECRET": ""}, ["WEBSOCKET_RPC_WEBSOCKET_SECRET='***'"]),
    ],
)
def test_bad_environment_names_the_variable_and_value(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(RPCConfigurationError) as info:
        WebSocketRPCConfig.from_env(env)
    for name in names:
        assert name in str(info.value)
    assert "user:secret" not in str(info.value)


def test_bad_dramatiq_broker_url_names_the_variable_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from rpc_tasks import setup_broker

    monkeypatch.setenv("DRAMATIQ_BROKER_URL", "redsi://user:pw@localhost:6379/0")
    with pytest.raises(RPCConfigurationError) as info:
        setup_broker(config=WebSocketRPCConfig(), set_global=False)
    assert "DRAMATIQ_BROKER_URL='redsi://user:***@localhost:6379/0'" in str(info.value)
