"""Unit tests of the Pydantic wire models (rpc_tasks.models) and the error types."""

from __future__ import annotations

import math
import pickle
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import BaseModel, Field, ValidationError

import rpc_tasks
from rpc_tasks.exceptions import RPCRemoteError, RPCTimeoutError
from rpc_tasks.models import (
    DEFAULT_RETRYABLE_CODES,
    BaseRPCMessage,
    BaseRPCRequest,
    BaseRPCResponse,
    BatchNotificationRequest,
    BatchNotificationResponse,
    BroadcastRequest,
    BroadcastResponse,
    BroadcastTarget,
    ConnectionInfo,
    ConnectionState,
    ConnectionStateUpdate,
    NotificationPriority,
    NotificationRequest,
    NotificationResponse,
    RateLimitError,
    RPCError,
    RPCErrorCode,
    RPCRequest,
    RPCResponse,
    RPCValidationError,
    TimeoutError,
    TimeoutErrorModel,
    UserNotConnectedError,
)


class EchoParams(BaseModel):
    message: str = Field(max_length=50)
    count: int = 1


class EchoResult(BaseModel):
    message: str
    length: int


# -- package surface ---------------------------------------------------------------------------


def test_every_public_name_is_importable() -> None:
    for name in rpc_tasks.__all__:
        assert hasattr(rpc_tasks, name), name


# -- every model constructs --------------------------------------------------------------------


SENSIBLE_MODELS: list[BaseModel] = [
    BaseRPCMessage(),
    BaseRPCRequest(method="notifications.send_user", reply_to="list:response:abc", timeout=10),
    BaseRPCResponse(success=True),
    BaseRPCResponse(success=False, error="boom", error_code="internal_error"),
    BroadcastRequest(event_type="news", payload={"headline": "hi"}),
    BroadcastRequest(target=BroadcastTarget.ROOM, room="lobby", event_type="chat"),
    BroadcastRequest(target="users", user_ids=["1", "2"], event_type="ping", exclude_user_ids=["2"]),
    BroadcastResponse(recipients=3, users=2),
    ConnectionInfo(connection_id="c1", user_id="42", instance_id="ws-1", rooms=["lobby"]),
    ConnectionStateUpdate(user_id="42", connection_id="c1", state=ConnectionState.CONNECTED),
    NotificationRequest(
        user_id="42",
        notification_type="order_shipped",
        title="Shipped",
        message="Your order is on its way",
        priority=NotificationPriority.HIGH,
        data={"order": 7},
    ),
    NotificationResponse(delivered=True, user_connected=True, connection_count=2, notification_id="n1"),
    BatchNotificationRequest(user_ids=["1", "2"], notification_type="promo", title="Sale", message="50%"),
    BatchNotificationResponse(
        total=2, delivered=1, failed=1, delivered_user_ids=["1"], offline_user_ids=["2"]
    ),
    RPCError(code=RPCErrorCode.METHOD_NOT_FOUND, message="no such method"),
    RPCValidationError(message="bad params", details={"errors": []}),
    TimeoutError(message="too slow", timeout_seconds=2.5),
    UserNotConnectedError(message="offline", user_id="42"),
    RateLimitError(message="slow down", retry_after=1.5, limit=10, window_seconds=60),
    RPCRequest[EchoParams](method="echo", params=EchoParams(message="hi")),
    RPCResponse[EchoResult](success=True, result=EchoResult(message="hi", length=2)),
]


@pytest.mark.parametrize("model", SENSIBLE_MODELS, ids=lambda m: type(m).__name__)
def test_model_json_round_trip(model: BaseModel) -> None:
    again = type(model).model_validate_json(model.model_dump_json())
    assert again == model


def test_base_message_defaults_are_fresh_and_utc() -> None:
    a, b = BaseRPCMessage(), BaseRPCMessage()
    assert a.correlation_id != b.correlation_id
    assert len(a.correlation_id) == 36  # uuid4 string
    assert a.timestamp.tzinfo is not None
    assert a.timestamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - a.timestamp) < timedelta(seconds=5)


def test_base_message_timestamp_normalised_to_utc() -> None:
    naive = BaseRPCMessage(timestamp=datetime(2026, 1, 1, 12, 0, 0))
    assert naive.timestamp == datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    plus2 = timezone(timedelta(hours=2))
    shifted = BaseRPCMessage(timestamp=datetime(2026, 1, 1, 12, 0, 0, tzinfo=plus2))
    assert shifted.timestamp.utcoffset() == timedelta(0)
    assert shifted.timestamp.hour == 10


@pytest.mark.parametrize("cid", ["", "x" * 129])
def test_base_message_correlation_id_length(cid: str) -> None:
    with pytest.raises(ValidationError):
        BaseRPCMessage(correlation_id=cid)


def test_base_message_ignores_unknown_keys() -> None:
    msg = BaseRPCMessage.model_validate({"correlation_id": "abc", "from_the_future": 1})
    assert msg.correlation_id == "abc"
    assert not hasattr(msg, "from_the_future")


# -- BaseRPCRequest ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["echo", "notifications.send_user", "A.b_C.9", "x" * 256])
def test_request_accepts_valid_method_names(method: str) -> None:
    assert BaseRPCRequest(method=method).method == method


@pytest.mark.parametrize(
    "method",
    ["", "send-user", "send user", "a/b", "a:b", "échec", "x" * 257, " echo", "echo;drop", "a*"],
)
def test_request_rejects_bad_method_names(method: str) -> None:
    with pytest.raises(ValidationError):
        BaseRPCRequest(method=method)


def test_request_rejects_method_name_with_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        BaseRPCRequest(method="echo\n")


@pytest.mark.parametrize("timeout", [0, 1, 30, 300])
def test_request_timeout_bounds_accepted(timeout: int) -> None:
    req = BaseRPCRequest(method="echo", timeout=timeout)
    assert req.timeout == timeout
    assert req.is_fire_and_forget is (timeout == 0)


@pytest.mark.parametrize("timeout", [-1, 301, 10_000])
def test_request_timeout_bounds_rejected(timeout: int) -> None:
    with pytest.raises(ValidationError):
        BaseRPCRequest(method="echo", timeout=timeout)


def test_request_defaults() -> None:
    req = BaseRPCRequest(method="echo")
    assert req.timeout == 30
    assert req.reply_to is None
    assert not req.is_fire_and_forget


def test_response_raise_for_error() -> None:
    BaseRPCResponse(success=True).raise_for_error()  # no exception
    with pytest.raises(RPCRemoteError) as info:
        BaseRPCResponse(success=False, error="gone", error_code="user_not_connected").raise_for_error()
    assert info.value.code is RPCErrorCode.USER_NOT_CONNECTED
    assert info.value.error.message == "gone"


# -- RPCRequest[T] / RPCResponse[T] ------------------------------------------------------------


def test_generic_request_validates_nested_params() -> None:
    req = RPCRequest[EchoParams].model_validate({"method": "echo", "params": {"message": "hi", "count": "3"}})
    assert isinstance(req.params, EchoParams)
    assert req.params.count == 3
    with pytest.raises(ValidationError):
        RPCRequest[EchoParams].model_validate({"method": "echo", "params": {"count": 1}})
    with pytest.raises(ValidationError):
        RPCRequest[EchoParams](method="echo", params={"message": "x" * 51})
    with pytest.raises(ValidationError):
        RPCRequest[EchoParams](method="echo")  # params is required


def test_generic_request_still_checks_method_name() -> None:
    with pytest.raises(ValidationError):
        RPCRequest[EchoParams](method="bad name", params=EchoParams(message="hi"))


def test_generic_response_validates_nested_result() -> None:
    resp = RPCResponse[EchoResult].model_validate(
        {"success": True, "result": {"message": "hi", "length": "2"}}
    )
    assert isinstance(resp.result, EchoResult)
    assert resp.result.length == 2
    with pytest.raises(ValidationError):
        RPCResponse[EchoResult].model_validate({"success": True, "result": {"message": "hi"}})
    failed = RPCResponse[EchoResult](success=False, error="nope", error_code="timeout")
    assert failed.result is None


def test_generic_round_trip_keeps_types() -> None:
    req = RPCRequest[EchoParams](method="echo", params=EchoParams(message="hi", count=2))
    again = RPCRequest[EchoParams].model_validate_json(req.model_dump_json())
    assert again.params == EchoParams(message="hi", count=2)
    assert again.correlation_id == req.correlation_id


# -- RPCError ----------------------------------------------------------------------------------


def test_default_retryable_codes() -> None:
    assert {
        RPCErrorCode.TIMEOUT,
        RPCErrorCode.SERVICE_UNAVAILABLE,
        RPCErrorCode.RATE_LIMIT_EXCEEDED,
    } == DEFAULT_RETRYABLE_CODES


@pytest.mark.parametrize("code", list(RPCErrorCode))
def test_retryable_defaults_from_code(code: RPCErrorCode) -> None:
    expected = code in {"timeout", "service_unavailable", "rate_limit_exceeded"}
    assert RPCError(code=code).retryable is expected
    assert RPCError(code=code.value).retryable is expected  # wire string
    assert RPCError.from_wire(code.value, "m").retryable is expected


def test_default_error_is_internal_and_not_retryable() -> None:
    err = RPCError()
    assert err.code is RPCErrorCode.INTERNAL_ERROR
    assert err.retryable is False
    assert err.retry_after is None
    assert err.details == {}
    assert err.raw_code is None


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("timeout", False),
        ("service_unavailable", False),
        ("internal_error", True),
        ("validation_error", True),
    ],
)
def test_explicit_retryable_wins(code: str, retryable: bool) -> None:
    assert RPCError(code=code, retryable=retryable).retryable is retryable
    assert RPCError.from_wire(code, "m", retryable=retryable).retryable is retryable


def test_unknown_code_from_peer_maps_to_internal_error_and_keeps_raw() -> None:
    err = RPCError.from_wire("quota_exhausted", "out of quota")
    assert err.code is RPCErrorCode.INTERNAL_ERROR
    assert err.raw_code == "quota_exhausted"
    assert err.wire_code == "quota_exhausted"
    assert err.retryable is False
    assert "quota_exhausted" in str(err)
    # also through the constructor and model_validate
    assert RPCError(code="quota_exhausted").raw_code == "quota_exhausted"
    assert RPCError.model_validate({"code": "quota_exhausted"}).wire_code == "quota_exhausted"


def test_known_code_has_no_raw_code_and_wire_code_is_value() -> None:
    err = RPCError(code="rate_limit_exceeded")
    assert err.raw_code is None
    assert err.wire_code == "rate_limit_exceeded"
    # wire codes are case-insensitive
    assert RPCError(code="TIMEOUT").code is RPCErrorCode.TIMEOUT


def test_missing_code_from_wire_is_internal_error() -> None:
    err = RPCError.from_wire(None, "something broke")
    assert err.code is RPCErrorCode.INTERNAL_ERROR
    assert err.raw_code is None
    assert err.message == "something broke"


@pytest.mark.parametrize("value", [0, 0.001, 2.5, 3600, 1e6])
def test_retry_after_accepts_non_negative_floats(value: float) -> None:
    err = RPCError(code="rate_limit_exceeded", retry_after=value)
    assert err.retry_after == value
    assert isinstance(err.retry_after, float)


@pytest.mark.parametrize("value", [-0.001, -1, float("nan")])
def test_retry_after_rejects_negative(value: float) -> None:
    with pytest.raises(ValidationError):
        RPCError(retry_after=value)


def test_retry_after_rejects_infinity() -> None:
    with pytest.raises(ValidationError):
        RPCError(retry_after=math.inf)


def test_error_str_mentions_code_message_and_retry_hint() -> None:
    text = str(RateLimitError(message="slow down", retry_after=2.5))
    assert "rate_limit_exceeded" in text
    assert "slow down" in text
    assert "2.5" in text


def test_error_details_survive() -> None:
    err = RPCError(code="invalid_request", details={"field": "x", "n": [1, 2]})
    assert err.details == {"field": "x", "n": [1, 2]}


# -- RPCError subclasses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code", "retryable"),
    [
        (RPCValidationError, RPCErrorCode.VALIDATION_ERROR, False),
        (TimeoutError, RPCErrorCode.TIMEOUT, True),
        (UserNotConnectedError, RPCErrorCode.USER_NOT_CONNECTED, False),
        (RateLimitError, RPCErrorCode.RATE_LIMIT_EXCEEDED, True),
    ],
)
def test_subclass_default_code_and_retryable(
    cls: type[RPCError], code: RPCErrorCode, retryable: bool
) -> None:
    err = cls(message="m")
    assert isinstance(err, RPCError)
    assert err.code is code
    assert err.wire_code == code.value
    assert err.retryable is retryable


def test_subclass_extra_fields() -> None:
    assert TimeoutErrorModel is TimeoutError
    assert TimeoutError(timeout_seconds=1.5).timeout_seconds == 1.5
    assert UserNotConnectedError(user_id="42").user_id == "42"
    rl = RateLimitError(limit=5, window_seconds=1.0, retry_after=0.25)
    assert (rl.limit, rl.window_seconds, rl.retry_after) == (5, 1.0, 0.25)
    assert RateLimitError(retryable=False).retryable is False


def test_validation_error_errors_property() -> None:
    errors = [{"loc": ["message"], "msg": "Field required", "type": "missing"}]
    assert RPCValidationError(details={"errors": errors}).errors == errors
    assert RPCValidationError().errors == []
    assert RPCValidationError(details={"errors": "not a list"}).errors == []


# -- exceptions carrying errors ----------------------------------------------------------------


def test_remote_error_from_code_and_properties() -> None:
    exc = RPCRemoteError.from_code(RPCErrorCode.RATE_LIMIT_EXCEEDED, "slow", retry_after=3.0)
    assert exc.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert exc.is_retryable is True
    assert exc.retry_after == 3.0
    assert RPCRemoteError.from_code("timeout", "t", retryable=False).is_retryable is False
    assert RPCRemoteError("quota_exhausted", "no quota").error.raw_code == "quota_exhausted"


def test_exceptions_pickle() -> None:
    remote = RPCRemoteError(RateLimitError(message="slow", retry_after=1.0, details={"a": 1}))
    again = pickle.loads(pickle.dumps(remote))
    assert isinstance(again, RPCRemoteError)
    assert again.error == remote.error
    timeout = pickle.loads(pickle.dumps(RPCTimeoutError("echo", 2.5)))
    assert (timeout.method, timeout.timeout_seconds) == ("echo", 2.5)
    assert "2.5" in str(timeout)


# -- Broadcast ---------------------------------------------------------------------------------


def test_broadcast_defaults_to_all() -> None:
    req = BroadcastRequest(event_type="news")
    assert req.target is BroadcastTarget.ALL
    assert req.payload == {}
    assert req.user_ids == []


def test_broadcast_room_needs_room() -> None:
    with pytest.raises(ValidationError, match="room"):
        BroadcastRequest(target="room", event_type="chat")
    with pytest.raises(ValidationError):
        BroadcastRequest(target="room", room="", event_type="chat")
    assert BroadcastRequest(target="room", room="lobby", event_type="chat").room == "lobby"


def test_broadcast_users_needs_user_ids() -> None:
    with pytest.raises(ValidationError, match="user"):
        BroadcastRequest(target="users", event_type="ping")
    with pytest.raises(ValidationError):
        BroadcastRequest(target="users", user_ids=[], event_type="ping")
    assert BroadcastRequest(target="users", user_ids=["7"], event_type="ping").user_ids == ["7"]


@pytest.mark.parametrize(
    "data",
    [
        {"target": "everyone", "event_type": "x"},
        {"event_type": ""},
    ],
)
def test_broadcast_rejects_bad_requests(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BroadcastRequest.model_validate(data)


def test_broadcast_response_counts_non_negative() -> None:
    with pytest.raises(ValidationError):
        BroadcastResponse(recipients=-1)
    assert BroadcastResponse(recipients=0).users == 0


# -- notifications / connections ---------------------------------------------------------------


def test_notification_request_validation() -> None:
    ok = NotificationRequest(user_id="1", notification_type="t", title="", message="")
    assert ok.priority is NotificationPriority.NORMAL
    assert ok.require_connected is False
    with pytest.raises(ValidationError):
        NotificationRequest(user_id="", notification_type="t", title="", message="")
    # unknown keys are ignored (django-ipc's peers send some), not refused
    assert NotificationRequest(user_id="1", notification_type="t", title="", message="", extra=1) == ok
    with pytest.raises(ValidationError):
        NotificationRequest(user_id="1", notification_type="t", title="", message="", priority="meh")


def test_batch_notification_user_id_bounds() -> None:
    base = {"notification_type": "t", "title": "x", "message": "y"}
    with pytest.raises(ValidationError):
        BatchNotificationRequest(user_ids=[], **base)
    with pytest.raises(ValidationError):
        BatchNotificationRequest(user_ids=[str(i) for i in range(1001)], **base)
    assert len(BatchNotificationRequest(user_ids=[str(i) for i in range(1000)], **base).user_ids) == 1000


def test_notification_response_counts() -> None:
    with pytest.raises(ValidationError):
        NotificationResponse(delivered=False, user_connected=False, connection_count=-1)
    with pytest.raises(ValidationError):
        BatchNotificationResponse(total=-1, delivered=0, failed=0)


def test_connection_models() -> None:
    info = ConnectionInfo(connection_id="c", user_id="u")
    assert info.connected_at.tzinfo is not None
    assert info.rooms == [] and info.metadata == {}
    update = ConnectionStateUpdate.model_validate(
        {"user_id": "u", "connection_id": "c", "state": "disconnected"}
    )
    assert update.state is ConnectionState.DISCONNECTED
    with pytest.raises(ValidationError):
        ConnectionStateUpdate(user_id="u", connection_id="c", state="sleeping")
