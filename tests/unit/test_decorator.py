"""Unit tests of @rpc_actor (decoration-time inference, validated .send()) and broker set-up.

Uses Dramatiq's StubBroker only: nothing is processed and no Redis is needed. This module uses
postponed (string) annotations on purpose, to check that the models are still inferred.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Retries, TimeLimit
from dramatiq.middleware.asyncio import AsyncIO
from pydantic import BaseModel, Field, ValidationError

from rpc_tasks import (
    RPCActor,
    RPCPayloadTooLargeError,
    RPCRemoteError,
    WebSocketRPCConfig,
    check_broker,
    find_replies_middleware,
    install_middleware,
    middleware_paths,
    rpc_actor,
    setup_broker,
)
from rpc_tasks.exceptions import RPCConfigurationError
from rpc_tasks.middleware import RPCIdempotency, RPCRateLimits, RPCReplies, RPCRetries
from rpc_tasks.models import RPCErrorCode

CONFIG = WebSocketRPCConfig(redis_url="redis://127.0.0.1:6379/9")


class EchoParams(BaseModel):
    message: str = Field(max_length=100)
    repeat: int = Field(default=1, ge=1, le=5)
    sent_at: datetime | None = None


class EchoResult(BaseModel):
    message: str


class OtherParams(BaseModel):
    n: int


@pytest.fixture
def broker() -> StubBroker:
    b = setup_broker(StubBroker(), config=CONFIG, set_global=False)
    assert isinstance(b, StubBroker)
    return b


@pytest.fixture
def queue() -> str:
    return f"q_{uuid.uuid4().hex}"


def _name() -> str:
    return f"actor_{uuid.uuid4().hex}"


def _queued(broker: StubBroker, queue: str) -> int:
    q = broker.queues.get(queue)
    return 0 if q is None else q.qsize()


def _make_echo(broker: StubBroker, queue: str, **options: Any) -> RPCActor[Any, Any]:
    @rpc_actor(broker=broker, queue_name=queue, actor_name=_name(), **options)
    def echo(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message * params.repeat)

    return echo


# -- decoration-time inference -----------------------------------------------------------------


def test_models_inferred_from_string_annotations(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    assert isinstance(echo.fn.__annotations__["params"], str)  # postponed annotations really are strings
    assert echo.params_model is EchoParams
    assert echo.result_model is EchoResult


def test_models_inferred_from_real_class_annotations(broker: StubBroker, queue: str) -> None:
    def compute(params):  # type: ignore[no-untyped-def]
        return EchoResult(message=str(params.n))

    compute.__annotations__ = {"params": OtherParams, "return": EchoResult}
    actor = rpc_actor(broker=broker, queue_name=queue)(compute)
    assert actor.params_model is OtherParams
    assert actor.result_model is EchoResult


def test_result_is_a_dramatiq_actor(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue, max_retries=2)
    assert isinstance(echo, dramatiq.Actor)
    assert isinstance(echo, RPCActor)
    assert broker.actors[echo.actor_name] is echo
    assert echo.queue_name == queue
    assert echo.options == {"max_retries": 2}
    assert queue in broker.queues
    assert echo.__name__ == "echo"  # wraps the function


def test_default_actor_name_is_function_name(broker: StubBroker, queue: str) -> None:
    @rpc_actor(broker=broker, queue_name=queue)
    def uniquely_named_echo(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message)

    assert uniquely_named_echo.actor_name == "uniquely_named_echo"
    assert "uniquely_named_echo" in broker.actors


def test_explicit_models_need_no_annotations(broker: StubBroker, queue: str) -> None:
    @rpc_actor(broker=broker, queue_name=queue, params_model=OtherParams, result_model=EchoResult)
    def untyped(params):  # type: ignore[no-untyped-def]
        return {"message": str(params.n)}

    assert untyped.params_model is OtherParams
    assert untyped.result_model is EchoResult
    assert untyped(OtherParams(n=3)) == EchoResult(message="3")


def test_explicit_models_override_annotations(broker: StubBroker, queue: str) -> None:
    @rpc_actor(broker=broker, queue_name=queue, params_model=OtherParams, result_model=None)
    def overridden(params: EchoParams) -> EchoResult:
        return EchoResult(message="ignored")

    assert overridden.params_model is OtherParams
    assert overridden.result_model is None


def test_explicit_models_when_annotations_cannot_be_resolved(broker: StubBroker, queue: str) -> None:
    def fn(params: NoSuchModel) -> AlsoMissing:  # type: ignore[name-defined]  # noqa: F821
        return None

    actor = rpc_actor(broker=broker, queue_name=queue, params_model=EchoParams, result_model=EchoResult)(fn)
    assert (actor.params_model, actor.result_model) == (EchoParams, EchoResult)


def test_none_return_is_allowed(broker: StubBroker, queue: str) -> None:
    seen: list[EchoParams] = []

    @rpc_actor(broker=broker, queue_name=queue)
    def record(params: EchoParams) -> None:
        seen.append(params)

    assert record.result_model is None
    assert record({"message": "x"}) is None
    assert seen == [EchoParams(message="x")]


def _no_param_annotation(params) -> EchoResult:  # type: ignore[no-untyped-def]
    return EchoResult(message="x")


def _int_param(params: int) -> EchoResult:
    return EchoResult(message="x")


def _dict_param(params: dict[str, Any]) -> EchoResult:
    return EchoResult(message="x")


def _model_instance_annotation(params: EchoParams) -> str:
    return "x"


def _no_return_annotation(params: EchoParams):  # type: ignore[no-untyped-def]
    return EchoResult(message="x")


def _optional_return(params: EchoParams) -> EchoResult | None:
    return None


def _two_params(params: EchoParams, other: EchoParams) -> EchoResult:
    return EchoResult(message="x")


def _no_params() -> EchoResult:
    return EchoResult(message="x")


def _required_kwonly(params: EchoParams, *, flag: bool) -> EchoResult:
    return EchoResult(message="x")


def _unresolvable(params: UndefinedModel) -> EchoResult:  # type: ignore[name-defined]  # noqa: F821
    return EchoResult(message="x")


def _basemodel_itself_returned(params: EchoParams) -> list[EchoResult]:
    return []


@pytest.mark.parametrize(
    "fn",
    [
        _no_param_annotation,
        _int_param,
        _dict_param,
        _model_instance_annotation,
        _no_return_annotation,
        _optional_return,
        _two_params,
        _no_params,
        _required_kwonly,
        _unresolvable,
        _basemodel_itself_returned,
    ],
    ids=lambda f: f.__name__,
)
def test_bad_signatures_raise_type_error_at_decoration(broker: StubBroker, queue: str, fn: Any) -> None:
    with pytest.raises(TypeError):
        rpc_actor(broker=broker, queue_name=queue)(fn)
    assert fn.__name__ not in broker.actors  # nothing was declared


def test_non_model_explicit_params_rejected(broker: StubBroker, queue: str) -> None:
    with pytest.raises(TypeError):
        rpc_actor(broker=broker, queue_name=queue, params_model=dict)(_int_param)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rpc_actor(broker=broker, queue_name=queue, result_model=int)(_int_param)  # type: ignore[arg-type]


def test_async_function_makes_an_async_actor_on_a_broker_with_asyncio(broker: StubBroker, queue: str) -> None:
    async def coro(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message)

    broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, AsyncIO)]
    actor = rpc_actor(broker=broker, queue_name=queue)(coro)
    assert actor.is_async and actor.params_model is EchoParams and actor.result_model is EchoResult
    assert sum(isinstance(m, AsyncIO) for m in broker.middleware) == 1  # added for it
    assert asyncio.run(actor(EchoParams(message="x"))) == EchoResult(message="x")


def test_unknown_actor_option_raises_value_error(broker: StubBroker, queue: str) -> None:
    name = _name()
    with pytest.raises(ValueError, match="not_a_real_option"):

        @rpc_actor(broker=broker, queue_name=queue, actor_name=name, not_a_real_option=1)
        def echo(params: EchoParams) -> EchoResult:
            return EchoResult(message=params.message)

    assert name not in broker.actors


def test_known_actor_options_accepted(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue, max_retries=0, min_backoff=10, time_limit=1000, throws=(KeyError,))
    assert echo.options["max_retries"] == 0
    assert echo.options["time_limit"] == 1000


def test_duplicate_actor_name_rejected(broker: StubBroker, queue: str) -> None:
    name = _name()
    rpc_actor(broker=broker, queue_name=queue, actor_name=name)(_model_ok)
    with pytest.raises(ValueError):
        rpc_actor(broker=broker, queue_name=queue, actor_name=name)(_model_ok)


def _model_ok(params: EchoParams) -> EchoResult:
    return EchoResult(message=params.message)


# -- .send() -----------------------------------------------------------------------------------


def test_send_with_dict_is_validated_and_args_are_one_json_dict(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    message = echo.send({"message": "hi", "repeat": "2", "sent_at": when})
    assert isinstance(message, dramatiq.Message)
    assert message.actor_name == echo.actor_name
    assert message.queue_name == queue
    assert message.kwargs == {}
    assert len(message.args) == 1
    (payload,) = message.args
    assert isinstance(payload, dict)
    assert json.loads(json.dumps(payload)) == payload  # plain JSON, no datetimes or models
    assert payload == {"message": "hi", "repeat": 2, "sent_at": "2026-01-02T03:04:05Z"}
    assert _queued(broker, queue) == 1
    assert EchoParams.model_validate(payload).sent_at == when


def test_send_with_model_instance(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    message = echo.send(EchoParams(message="hi"))
    assert message.args == ({"message": "hi", "repeat": 1, "sent_at": None},)
    assert _queued(broker, queue) == 1


def test_send_passes_message_options(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    message = echo.send({"message": "hi"}, max_retries=1)
    assert message.options["max_retries"] == 1


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"message": 123},
        {"message": "x" * 101},
        {"message": "ok", "repeat": 0},
        {"message": "ok", "repeat": "many"},
        OtherParams(n=1),
        "a string",
        None,
        42,
    ],
)
def test_send_with_invalid_params_enqueues_nothing(broker: StubBroker, queue: str, params: Any) -> None:
    echo = _make_echo(broker, queue)
    with pytest.raises(ValidationError):
        echo.send(params)
    with pytest.raises(ValidationError):
        echo.send_with_options(args=(params,), delay=10)
    with pytest.raises(ValidationError):
        echo.message(params)
    assert _queued(broker, queue) == 0
    assert all(q.qsize() == 0 for q in broker.queues.values())


def test_send_over_payload_limit_enqueues_nothing(queue: str) -> None:
    small = WebSocketRPCConfig(redis_url="redis://127.0.0.1:6379/9", max_payload_bytes=1024)
    broker = setup_broker(StubBroker(), config=small, set_global=False)

    class Blob(BaseModel):
        data: str

    @rpc_actor(broker=broker, queue_name=queue, params_model=Blob, result_model=None)
    def store(params):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(RPCPayloadTooLargeError):
        store.send({"data": "x" * 2000})
    assert _queued(broker, queue) == 0
    store.send({"data": "x" * 100})
    assert _queued(broker, queue) == 1


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {"params": {"message": "hi"}}),
        ((), {"message": "hi"}),
        (({"message": "hi"},), {"extra": 1}),
        (({"message": "hi"}, {"message": "again"}), None),
        ((), None),
    ],
)
def test_kwargs_or_wrong_arity_raise_type_error(
    broker: StubBroker, queue: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> None:
    echo = _make_echo(broker, queue)
    with pytest.raises(TypeError):
        echo.send_with_options(args=args, kwargs=kwargs)
    with pytest.raises(TypeError):
        echo.message_with_options(args=args, kwargs=kwargs)
    assert _queued(broker, queue) == 0


def test_send_with_keyword_params_is_type_error(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    with pytest.raises(TypeError):
        echo.send(params={"message": "hi"})  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        echo.send()  # type: ignore[call-arg]
    assert _queued(broker, queue) == 0


# -- calling the actor directly ----------------------------------------------------------------


def test_direct_call_returns_result_model(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    result = echo(EchoParams(message="ab", repeat=2))
    assert isinstance(result, EchoResult)
    assert result == EchoResult(message="abab")
    assert echo({"message": "c"}) == EchoResult(message="c")
    assert _queued(broker, queue) == 0  # nothing is enqueued


def test_direct_call_validates_params(broker: StubBroker, queue: str) -> None:
    echo = _make_echo(broker, queue)
    with pytest.raises(ValidationError):
        echo({"message": 5})
    with pytest.raises(TypeError):
        echo(params=EchoParams(message="x"))
    with pytest.raises(TypeError):
        echo()


def test_direct_call_coerces_and_checks_result(broker: StubBroker, queue: str) -> None:
    @rpc_actor(broker=broker, queue_name=queue, actor_name=_name())
    def as_dict(params: EchoParams) -> EchoResult:
        return {"message": params.message}  # type: ignore[return-value]

    @rpc_actor(broker=broker, queue_name=queue, actor_name=_name())
    def broken(params: EchoParams) -> EchoResult:
        return {"wrong": 1}  # type: ignore[return-value]

    assert as_dict({"message": "m"}) == EchoResult(message="m")
    with pytest.raises(RPCRemoteError) as info:
        broken({"message": "m"})
    assert info.value.code is RPCErrorCode.INTERNAL_ERROR


# -- broker set-up -----------------------------------------------------------------------------


def test_setup_broker_reports_no_problems(broker: StubBroker) -> None:
    assert check_broker(broker) == []
    kinds = [type(m) for m in broker.middleware]
    assert kinds[0] is RPCReplies
    assert kinds.count(RPCReplies) == 1
    assert kinds.count(RPCRetries) == 1
    assert Retries not in kinds
    assert find_replies_middleware(broker).config is CONFIG


def test_setup_broker_set_global_false_leaves_global_broker(broker: StubBroker) -> None:
    import dramatiq.broker

    assert dramatiq.broker.global_broker is not broker


def test_setup_broker_order_matches_middleware_paths(broker: StubBroker) -> None:
    def resolve(path: str) -> type:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]

    assert [resolve(p) for p in middleware_paths()] == [type(m) for m in broker.middleware]


def test_check_broker_reports_plain_stub_broker() -> None:
    problems = check_broker(StubBroker())
    text = " ".join(problems)
    assert len(problems) == 4
    assert "RPCReplies" in text and "missing" in text
    assert any("RPCRateLimits middleware is missing" in p for p in problems)
    assert "dramatiq.middleware.Retries" in text
    assert "RPCRetries middleware is missing" in problems


def test_check_broker_reports_wrong_order_and_duplicates() -> None:
    wrong_order = StubBroker(middleware=[AgeLimit(), RPCReplies(CONFIG), RPCRateLimits(CONFIG), RPCRetries()])
    assert len(check_broker(wrong_order)) == 1
    assert "first" in check_broker(wrong_order)[0]
    limits_first = StubBroker(middleware=[RPCRateLimits(CONFIG), RPCReplies(CONFIG), RPCRetries()])
    assert any("after RPCReplies" in p for p in check_broker(limits_first))
    doubled = StubBroker(middleware=[RPCReplies(CONFIG), RPCRateLimits(CONFIG), RPCRetries(), RPCRetries()])
    assert len(check_broker(doubled)) == 1
    assert "more than once" in check_broker(doubled)[0]


def test_find_replies_middleware_missing() -> None:
    with pytest.raises(RPCConfigurationError):
        find_replies_middleware(StubBroker())


def test_middleware_paths() -> None:
    paths = middleware_paths()
    assert paths[0] == "rpc_tasks.middleware.RPCReplies"
    assert "rpc_tasks.middleware.RPCRetries" in paths
    assert "dramatiq.middleware.Retries" not in paths
    assert not any("Prometheus" in p for p in paths)
    assert len(paths) == len(set(paths))
    extended = middleware_paths(["myapp.middleware.Audit"])
    assert extended[:-1] == paths
    assert extended[-1] == "myapp.middleware.Audit"
    assert middleware_paths() == paths  # the extra list does not leak into later calls


def test_middleware_paths_are_importable() -> None:
    for path in middleware_paths():
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path


def test_install_middleware_is_idempotent() -> None:
    broker = StubBroker()
    install_middleware(broker, CONFIG)
    first = list(broker.middleware)
    assert install_middleware(broker, CONFIG) is broker
    install_middleware(broker)
    assert broker.middleware == first
    assert check_broker(broker) == []


def test_install_middleware_copies_retries_settings() -> None:
    def retry_when(retries: int, exc: BaseException) -> bool:
        return retries < 2

    plain = Retries(max_retries=3, min_backoff=123, max_backoff=4567, retry_when=retry_when)
    broker = StubBroker(middleware=[AgeLimit(), plain, TimeLimit()])
    install_middleware(broker, CONFIG)
    kinds = [type(m) for m in broker.middleware]
    assert kinds == [
        RPCReplies,
        RPCRateLimits,
        RPCIdempotency,
        AgeLimit,
        RPCRetries,
        TimeLimit,
        AsyncIO,
    ]  # in place
    retries = broker.middleware[4]
    assert isinstance(retries, RPCRetries)
    assert retries.max_retries == 3
    assert retries.min_backoff == 123
    assert retries.max_backoff == 4567
    assert retries.retry_when is retry_when
    assert check_broker(broker) == []
    assert {"max_retries", "min_backoff", "max_backoff", "retry_when"} <= broker.actor_options


def test_install_middleware_on_empty_broker() -> None:
    broker = StubBroker(middleware=[])
    install_middleware(broker, CONFIG)
    assert [type(m) for m in broker.middleware] == [
        RPCReplies,
        RPCRateLimits,
        RPCIdempotency,
        RPCRetries,
        AsyncIO,
    ]
    assert "max_retries" in broker.actor_options
    assert check_broker(broker) == []
