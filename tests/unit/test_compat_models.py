"""Both families' field names are read, both are written, and replies to older peers use only
what they accept (codes, text length, UUID ids, non-null results)."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from rpc_tasks import compat, protocol
from rpc_tasks.models import (
    BatchNotificationRequest,
    BroadcastRequest,
    BroadcastResponse,
    BroadcastTarget,
    NotificationRequest,
    NotificationResponse,
    RPCError,
    RPCErrorCode,
)
from rpc_tasks.streams.builtins import EchoParams, echo
from rpc_tasks.websocket import ipc
from rpc_tasks.websocket.auth import TokenError, make_token, verify_token

SECRET = "unit-secret-" + "s" * 32


def test_notification_request_reads_both_names_and_nulls() -> None:
    ours = NotificationRequest.model_validate(
        {"user_id": "1", "notification_type": "a", "title": "t", "message": "m", "require_connected": True}
    )
    theirs = NotificationRequest.model_validate(
        {
            "user_id": "1",
            "type": "a",
            "title": "t",
            "message": "m",
            "priority": "high",
            "data": None,
            "expires_at": None,
            "unknown": 1,
        }
    )
    assert ours.notification_type == theirs.notification_type == "a"
    assert theirs.data == {} and theirs.expires_at is None
    wire = ours.model_dump(mode="json")
    assert wire["type"] == wire["notification_type"] == "a"
    assert NotificationRequest.model_validate(wire) == ours


def test_notification_request_expiry() -> None:
    past = NotificationRequest(
        user_id="1", type="a", title="t", message="m", expires_at="2000-01-01T00:00:00Z"
    )
    assert past.expired
    assert not NotificationRequest(user_id="1", type="a", title="t", message="m").expired


def test_notification_response_reads_either_family_and_writes_both() -> None:
    theirs = NotificationResponse.model_validate(
        {"user_id": "42", "delivered": True, "connections": 2, "error": None, "queued_for_later": False}
    )
    assert theirs.user_connected and theirs.connection_count == 2
    ours = NotificationResponse.model_validate(
        {"delivered": False, "user_connected": False, "connection_count": 0}
    )
    assert ours.connections == 0 and ours.user_id == ""
    wire = NotificationResponse(
        user_id="42", delivered=True, user_connected=True, connection_count=1
    ).model_dump()
    assert {"user_id", "delivered", "connections", "error", "queued_for_later"} <= set(wire)
    assert {"user_connected", "connection_count"} <= set(wire) and wire["connections"] == 1


def test_broadcast_request_both_shapes_and_target_user() -> None:
    theirs = BroadcastRequest.model_validate(
        {
            "target": "user",
            "type": "info",
            "title": "T",
            "message": "M",
            "user_id": "9",
            "user_ids": None,
            "data": None,
        }
    )
    assert theirs.event_type == "info" and theirs.recipients() == ["9"] and theirs.text == "M"
    with pytest.raises(ValueError):
        BroadcastRequest.model_validate({"target": "user", "type": "info"})
    ours = BroadcastRequest(event_type="system_update", payload={"v": 2})
    wire = ours.model_dump(mode="json")
    assert (wire["type"], wire["data"], wire["title"], wire["message"]) == (
        "system_update",
        {"v": 2},
        "system_update",
        "system_update",
    )
    assert wire["user_ids"] is None  # django-ipc refuses an empty list
    assert BroadcastRequest.model_validate(wire).payload == {"v": 2}
    answer = BroadcastResponse.model_validate(
        {"target": "room", "recipients": 3, "room": "r", "user_id": None}
    )
    assert answer.target is BroadcastTarget.ROOM and answer.users == 0


def test_batch_reads_both_shapes_and_writes_django_ipcs() -> None:
    ours = BatchNotificationRequest(user_ids=["1", "2", "1"], notification_type="a", title="t", message="m")
    assert [r.user_id for r in ours.requests()] == ["1", "2"]
    wire = ours.model_dump(mode="json")
    assert wire["notifications"][0]["type"] == "a" and wire["user_ids"] == ["1", "2", "1"]
    assert [r.user_id for r in BatchNotificationRequest.model_validate(wire).requests()] == ["1", "2"]
    assert BatchNotificationRequest.model_validate(wire) == ours  # no duplicates on the way back
    with pytest.raises(ValueError):
        BatchNotificationRequest.model_validate({})


def test_echo_result_has_echoed_and_length() -> None:
    result = echo(EchoParams.model_validate({"message": "health_check", "data": None}))
    assert (result.echoed, result.length, result.message) == ("health_check", 12, "health_check")


@pytest.mark.parametrize("code", list(RPCErrorCode))
def test_every_code_maps_onto_the_legacy_enum(code: RPCErrorCode) -> None:
    assert compat.legacy_error_code(RPCError(code=code, message="x")) in compat.LEGACY_ERROR_CODES


def test_legacy_codes_and_texts() -> None:
    assert compat.legacy_error_code(RPCError(code=RPCErrorCode.INVALID_REQUEST)) == "invalid_params"
    assert compat.legacy_error_code(RPCError(code=RPCErrorCode.PAYLOAD_TOO_LARGE)) == "invalid_params"
    assert compat.legacy_error_code(RPCError.from_wire("brand_new_code", "x")) == "internal_error"
    assert compat.legacy_error_code(RPCError.from_wire("redis_error", "x")) == "redis_error"
    assert len(compat.legacy_error_text("é" * 2000)) == 500
    assert compat.legacy_error_text("   ") == "remote call failed"
    assert compat.legacy_correlation_id("not-a-uuid") == compat.UNKNOWN_CORRELATION_ID


def test_replies_to_non_announcing_callers_fit_older_clients() -> None:
    error = RPCError(code=RPCErrorCode.PAYLOAD_TOO_LARGE, message="z" * 3000)
    old = json.loads(protocol.encode_response("c", error=error, extended=False))
    assert set(old) == {"correlation_id", "timestamp", "success", "result", "error", "error_code"}
    assert old["error_code"] == "invalid_params" and len(old["error"]) == 500
    new = json.loads(protocol.encode_response("c", error=error, extended=True))
    assert new["error_code"] == "payload_too_large" and len(new["error"]) > 500 and "error_details" in new
    assert json.loads(protocol.encode_response("c", result=None, extended=False))["result"] == {}
    assert json.loads(protocol.encode_response("c", result=None, extended=True))["result"] is None


def test_django_ipc_repr_errors_are_read_back() -> None:
    text = str(
        {
            "code": "validation_error",
            "message": "Validation failed",
            "validation_errors": [{"field": "type", "error": "Field required"}],
        }
    )
    raw = json.dumps({"correlation_id": "c", "success": False, "error": text, "error_code": "internal_error"})
    response = protocol.decode_response(raw)
    assert response.error is not None and response.error.code is RPCErrorCode.VALIDATION_ERROR
    assert "type: Field required" in response.error.message
    # anything else is left alone (and never evaluated as code)
    assert compat.unwrap_legacy_error("internal_error", "{'code': __import__('os')}") == (
        "internal_error",
        "{'code': __import__('os')}",
    )


def test_tokens_are_standard_jwts_with_either_user_claim() -> None:
    token = make_token("alice", SECRET, audience="app", issuer="me")
    assert jwt.decode(token, SECRET, algorithms=["HS256"], audience="app")["sub"] == "alice"
    assert verify_token(token, SECRET, audience="app", issuer="me").user_id == "alice"
    for claims, user in (({"user_id": 42}, "42"), ({"sub": "s"}, "s"), ({"id": "i"}, "i")):
        other = jwt.encode({**claims, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        assert verify_token(other, SECRET).user_id == user
    cases = {
        "bad signature": make_token("a", "another-secret-" + "x" * 32),
        "token expired": make_token("a", SECRET, ttl=-60),
        "malformed token": "garbage",
        "no user claim": jwt.encode({"name": "x"}, SECRET, algorithm="HS256"),
        "no token": "",
    }
    for reason, bad in cases.items():
        with pytest.raises(TokenError) as info:
            verify_token(bad, SECRET)
        assert info.value.reason == reason
    with pytest.raises(TokenError, match="wrong audience"):
        verify_token(make_token("a", SECRET), SECRET, audience="app")
    with pytest.raises(TokenError, match="wrong issuer"):
        verify_token(make_token("a", SECRET, issuer="x"), SECRET, issuer="me")


def test_ipc_dialect_frames() -> None:
    assert ipc.bearer_token("bearer abc.def.ghi") == "abc.def.ghi"
    assert ipc.bearer_token("Bearer a b") is None and ipc.bearer_token("abc") is None
    native = json.dumps(
        {
            "type": "notification",
            "id": "n",
            "payload": {
                "user_id": "1",
                "notification_type": "a",
                "title": "t",
                "message": "m",
                "data": {},
                "priority": "low",
            },
            "timestamp": "x",
        }
    )
    assert json.loads(ipc.to_ipc(native)) == {
        "type": "notification",
        "data": {"notification_type": "a", "title": "t", "message": "m", "data": {}, "priority": "low"},
    }
    error = json.loads(
        ipc.to_ipc(
            json.dumps(
                {"type": "error", "id": "7", "payload": {"code": "invalid_request", "message": "x" * 900}}
            )
        )
    )
    assert error["correlation_id"] == "7" and error["error"]["code"] == "invalid_params"
    assert len(error["error"]["message"]) == 500 and error["result"] is None
