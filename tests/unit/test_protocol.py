"""Unit tests of the wire protocol (rpc_tasks.protocol): keys, envelopes, error mapping, deadlines."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from rpc_tasks import protocol
from rpc_tasks.exceptions import (
    RPCConnectionError,
    RPCPayloadTooLargeError,
    RPCProtocolError,
    RPCRemoteError,
    RPCTimeoutError,
)
from rpc_tasks.models import (
    DEFAULT_RETRYABLE_CODES,
    RateLimitError,
    RPCError,
    RPCErrorCode,
    RPCValidationError,
    TimeoutError,
    UserNotConnectedError,
)
from rpc_tasks.protocol import (
    ERROR_DETAILS_EXTENSION,
    Response,
    decode_response,
    encode_response,
    error_from_exception,
)

ENVELOPE_KEYS = {"correlation_id", "timestamp", "success", "result", "error", "error_code"}
DECODE_ERRORS = (RPCProtocolError, RPCPayloadTooLargeError)

# Hypothesis: keep runs fast and do not write an example database into the project.
FAST = settings(max_examples=150, deadline=None, database=None)


class Echo(BaseModel):
    message: str
    count: int = 1


class Credentials(BaseModel):
    username: str = Field(max_length=8)
    pin: int
    token: str = Field(min_length=64)


def _json(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


# -- keys --------------------------------------------------------------------------------------


def test_reply_key() -> None:
    assert protocol.reply_key("list:response:", "abc-123") == "list:response:abc-123"
    assert protocol.reply_key("p:", "x") == "p:x"


@pytest.mark.parametrize("cid", ["", " ", "a b", "a\nb", "tab\t"])
def test_reply_key_rejects_bad_correlation_ids(cid: str) -> None:
    with pytest.raises(ValueError):
        protocol.reply_key("list:response:", cid)


def test_is_reply_key() -> None:
    assert protocol.is_reply_key("list:response:", "list:response:abc")
    assert not protocol.is_reply_key("list:response:", "list:response:")
    assert not protocol.is_reply_key("list:response:", "other:abc")
    assert not protocol.is_reply_key("list:response:", "list:response:" + "x" * 600)


# -- dumps / loads -----------------------------------------------------------------------------


def test_dumps_is_compact_utf8_json() -> None:
    assert protocol.dumps({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'.encode()


def test_dumps_errors() -> None:
    with pytest.raises(RPCProtocolError):
        protocol.dumps({"x": float("nan")})
    with pytest.raises(RPCProtocolError):
        protocol.dumps({"x": object()})
    with pytest.raises(RPCPayloadTooLargeError) as info:
        protocol.dumps({"x": "y" * 100}, max_bytes=50)
    assert info.value.limit == 50
    assert info.value.size > 50
    assert isinstance(info.value, ValueError)


# -- encode / decode: success ------------------------------------------------------------------


def test_success_round_trip_with_model() -> None:
    raw = encode_response("cid-1", result=Echo(message="hi", count=2))
    envelope = _json(raw)
    assert set(envelope) == ENVELOPE_KEYS  # no extension on a success
    assert envelope["success"] is True
    assert envelope["error"] is None and envelope["error_code"] is None
    assert envelope["timestamp"].endswith("Z")
    response = decode_response(raw)
    assert isinstance(response, Response)
    assert response.correlation_id == "cid-1"
    assert response.success is True
    assert response.error is None
    assert response.result == {"message": "hi", "count": 2}
    assert Echo.model_validate(response.result) == Echo(message="hi", count=2)
    assert response.timestamp == envelope["timestamp"]
    response.raise_for_error()  # no exception


def test_success_round_trip_with_mapping_and_none() -> None:
    assert decode_response(encode_response("c", result={"a": [1, "b"]})).result == {"a": [1, "b"]}
    empty = decode_response(encode_response("c", result=None))
    assert empty.success is True
    assert empty.result is None


def test_success_result_too_large_becomes_payload_too_large_error() -> None:
    raw = encode_response("big", result={"blob": "x" * 5000}, max_bytes=1024)
    response = decode_response(raw)
    assert response.success is False
    assert response.correlation_id == "big"
    assert response.error is not None
    assert response.error.code is RPCErrorCode.PAYLOAD_TOO_LARGE
    assert response.error.retryable is False
    assert "x" * 100 not in raw.decode()
    with pytest.raises(RPCRemoteError) as info:
        response.raise_for_error()
    assert info.value.code is RPCErrorCode.PAYLOAD_TOO_LARGE


def test_success_result_not_json_becomes_error() -> None:
    response = decode_response(encode_response("c", result={"s": {1, 2}}))
    assert response.success is False
    assert response.error is not None
    assert response.error.code is RPCErrorCode.INTERNAL_ERROR


# -- encode / decode: errors -------------------------------------------------------------------


def test_error_round_trip_extended_keeps_everything() -> None:
    error = RateLimitError(
        message="slow down", retryable=False, retry_after=2.375, details={"limit": 10, "who": ["a"]}
    )
    raw = encode_response("cid-2", error=error, extended=True)
    envelope = _json(raw)
    assert set(envelope) == ENVELOPE_KEYS | {ERROR_DETAILS_EXTENSION}
    assert envelope["success"] is False
    assert envelope["result"] is None
    assert envelope["error"] == "slow down"
    assert envelope["error_code"] == "rate_limit_exceeded"
    response = decode_response(raw)
    assert response.success is False
    assert response.result is None
    got = response.error
    assert got is not None
    assert got.code is RPCErrorCode.RATE_LIMIT_EXCEEDED
    assert got.message == "slow down"
    assert got.retryable is False  # explicit value survives, not the code's default
    assert got.retry_after == 2.375
    assert got.details == {"limit": 10, "who": ["a"]}
    with pytest.raises(RPCRemoteError) as info:
        response.raise_for_error()
    assert info.value.error == got


@pytest.mark.parametrize("code", list(RPCErrorCode))
def test_error_round_trip_without_extension(code: RPCErrorCode) -> None:
    error = RPCError(code=code, message="m", retryable=True, retry_after=1.5, details={"k": "v"})
    raw = encode_response("c", error=error, extended=False)
    envelope = _json(raw)
    assert set(envelope) == ENVELOPE_KEYS  # strict peers never see the extension
    got = decode_response(raw).error
    assert got is not None
    # strict peers get only their own codes (rpc_tasks.compat): ours that they lack are mapped
    legacy = {
        RPCErrorCode.INVALID_REQUEST: RPCErrorCode.INVALID_PARAMS,
        RPCErrorCode.PAYLOAD_TOO_LARGE: RPCErrorCode.INVALID_PARAMS,
    }
    assert got.code is legacy.get(code, code)
    assert got.message == "m"
    assert got.retry_after is None
    assert got.details == {}
    assert got.retryable is (got.code in {"timeout", "service_unavailable", "rate_limit_exceeded"})


def test_decode_plain_peer_response() -> None:
    peer = {
        "correlation_id": "abc",
        "timestamp": "2026-01-01T00:00:00Z",
        "success": False,
        "result": None,
        "error": "User 42 is not connected",
        "error_code": "user_not_connected",
    }
    response = decode_response(json.dumps(peer))
    assert response.correlation_id == "abc"
    assert response.timestamp == "2026-01-01T00:00:00Z"
    err = response.error
    assert err is not None
    assert err.code is RPCErrorCode.USER_NOT_CONNECTED
    assert err.message == "User 42 is not connected"
    assert err.retryable is False
    assert err.retry_after is None
    assert err.details == {}

    peer.update(error="busy", error_code="service_unavailable")
    busy = decode_response(json.dumps(peer).encode())
    assert busy.error is not None and busy.error.retryable is True

    ok = decode_response(json.dumps({"correlation_id": "abc", "success": True, "result": {"x": 1}}))
    assert ok.success is True and ok.result == {"x": 1} and ok.timestamp is None


def test_decode_unknown_error_code_from_peer() -> None:
    raw = json.dumps(
        {"correlation_id": "c", "success": False, "error": "out", "error_code": "quota_exhausted"}
    )
    err = decode_response(raw).error
    assert err is not None
    assert err.code is RPCErrorCode.INTERNAL_ERROR
    assert err.raw_code == "quota_exhausted"
    assert err.wire_code == "quota_exhausted"
    assert err.retryable is False
    # and it is forwarded unchanged if re-encoded
    assert _json(encode_response("c", error=err))["error_code"] == "quota_exhausted"


def test_decode_validation_error_gives_validation_error_model() -> None:
    errors = [{"loc": ["message"], "msg": "Field required", "type": "missing"}]
    raw = encode_response("c", error=RPCValidationError(message="bad", details={"errors": errors}))
    err = decode_response(raw).error
    assert isinstance(err, RPCValidationError)
    assert err.errors == errors


def test_decode_tolerates_odd_extension_and_fields() -> None:
    raw = json.dumps(
        {
            "correlation_id": "c",
            "success": False,
            "error": 42,
            "error_code": 7,
            ERROR_DETAILS_EXTENSION: {"retryable": "yes", "retry_after": -3, "details": [1]},
        }
    )
    err = decode_response(raw).error
    assert err is not None
    assert err.code is RPCErrorCode.INTERNAL_ERROR
    assert isinstance(err.message, str) and err.message
    assert err.retryable is False
    assert err.retry_after is None
    assert err.details == {}


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "true", '"3"', "null"])
def test_decode_ignores_invalid_retry_after(bad: str) -> None:
    raw = '{"correlation_id":"c","success":false,"error_details":{"retry_after":' + bad + "}}"
    err = decode_response(raw).error
    assert err is not None
    assert err.retry_after is None


def test_empty_message_is_replaced_by_code() -> None:
    err = decode_response(encode_response("c", error=RPCError(code="timeout"))).error
    assert err is not None and err.message == "timeout"


def test_long_error_message_is_truncated() -> None:
    raw = encode_response("c", error=RPCError(message="m" * 10_000))
    message = _json(raw)["error"]
    assert len(message) <= protocol.MAX_ERROR_MESSAGE
    assert message.endswith("...")


def test_error_details_not_json_are_dropped_but_reply_still_sent() -> None:
    error = RPCError(code="timeout", message="m", retry_after=1.0, details={"bad": {1, 2}})
    err = decode_response(encode_response("c", error=error)).error
    assert err is not None
    assert err.code is RPCErrorCode.TIMEOUT
    assert err.retry_after == 1.0
    assert err.details == {}


def test_error_details_too_large_are_dropped_but_reply_still_sent() -> None:
    error = RPCError(code="invalid_request", message="m", retry_after=0.5, details={"blob": "x" * 5000})
    raw = encode_response("c", error=error, max_bytes=2048)
    err = decode_response(raw).error
    assert err is not None
    assert err.code is RPCErrorCode.INVALID_REQUEST
    assert err.retry_after == 0.5
    assert err.details == {}


# -- decode: garbage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        "{",
        "[]",
        '[{"success": true}]',
        "42",
        '"success"',
        "null",
        "{}",
        '{"correlation_id": "c"}',
        '{"correlation_id": "c", "success": "true"}',
        '{"correlation_id": "c", "success": 1}',
        '{"correlation_id": "c", "success": null}',
        '{"success": true}',
        '{"correlation_id": 5, "success": true}',
        '{"correlation_id": null, "success": false}',
        "1" * 5000,
    ],
)
def test_decode_garbage_raises_protocol_error(data: bytes | str) -> None:
    with pytest.raises(RPCProtocolError):
        decode_response(data)


def test_decode_oversize_raises_payload_too_large() -> None:
    raw = encode_response("c", result={"blob": "x" * 500})
    with pytest.raises(RPCPayloadTooLargeError):
        decode_response(raw, max_bytes=len(raw) - 1)
    assert decode_response(raw, max_bytes=len(raw)).success is True
    with pytest.raises(RPCPayloadTooLargeError):
        decode_response(b"x" * 101, max_bytes=100)  # size is checked before parsing


def test_decode_str_oversize_is_measured_in_bytes() -> None:
    text = json.dumps({"correlation_id": "é" * 100, "success": True}, ensure_ascii=False)
    assert len(text.encode()) > 150 > len(text)
    with pytest.raises(RPCPayloadTooLargeError):
        decode_response(text, max_bytes=150)


def test_decode_deeply_nested_json_raises_protocol_error() -> None:
    with pytest.raises(DECODE_ERRORS):
        decode_response("[" * 100_000)


def test_decode_huge_integer_retry_after_is_dropped_not_an_error() -> None:
    """A retry_after too big for a float is not a usable hint: the error still decodes, with
    ``retry_after`` None."""
    raw = '{"correlation_id":"c","success":false,"error_details":{"retry_after":' + "9" * 400 + "}}"
    response = decode_response(raw)
    assert response.error is not None
    assert response.error.code is RPCErrorCode.INTERNAL_ERROR
    assert response.error.retry_after is None


def test_decode_lone_surrogate_in_error_message_is_replaced() -> None:
    """A lone surrogate (valid JSON escape, invalid Unicode) in the message is cleaned, and the
    rest of the error survives."""
    raw = r'{"correlation_id":"c","success":false,"error":"bad \udcff","error_code":"timeout"}'
    response = decode_response(raw)
    assert response.error is not None and response.error.code is RPCErrorCode.TIMEOUT
    assert response.error.message.startswith("bad ")
    response.error.message.encode("utf-8")  # encodable: no lone surrogate left
    assert "\udcff" not in response.error.message


# -- error_from_exception ----------------------------------------------------------------------


def test_error_from_remote_error_is_the_same_error() -> None:
    error = UserNotConnectedError(message="offline", user_id="42", retry_after=3.0)
    assert error_from_exception(RPCRemoteError(error)) is error


def test_error_from_validation_error_has_no_input_values() -> None:
    secret_name = "hunter2-very-secret-username"
    secret_token = "tok-" + "s" * 20
    with pytest.raises(ValidationError) as info:
        Credentials.model_validate(
            {"username": secret_name, "pin": "pin-" + secret_name, "token": secret_token}
        )
    error = error_from_exception(info.value)
    assert isinstance(error, RPCValidationError)
    assert error.code is RPCErrorCode.VALIDATION_ERROR
    assert error.retryable is False
    assert "Credentials" in error.message
    errors = error.errors
    assert {tuple(e["loc"]) for e in errors} == {("username",), ("pin",), ("token",)}
    for entry in errors:
        assert set(entry) == {"loc", "msg", "type"}
        assert isinstance(entry["msg"], str) and entry["msg"]
        assert isinstance(entry["type"], str) and entry["type"]
        assert all(isinstance(part, str) for part in entry["loc"])
    encoded = encode_response("c", error=error).decode()
    assert secret_name not in encoded
    assert secret_token not in encoded
    assert "hunter2" not in encoded
    assert secret_name not in json.dumps(error.model_dump(mode="json"))


def test_error_from_nested_validation_error_loc_is_strings() -> None:
    class Outer(BaseModel):
        items: list[Echo]

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"items": [{"message": "ok"}, {"count": "x"}]})
    locs = [e["loc"] for e in error_from_exception(info.value).details["errors"]]
    assert ["items", "1", "message"] in locs
    assert ["items", "1", "count"] in locs


def test_error_from_timeout() -> None:
    error = error_from_exception(RPCTimeoutError("echo", 2.5))
    assert isinstance(error, TimeoutError)
    assert error.code is RPCErrorCode.TIMEOUT
    assert error.retryable is True
    assert error.timeout_seconds == 2.5
    assert "echo" in error.message


def test_error_from_connection_error() -> None:
    error = error_from_exception(RPCConnectionError("redis went away"))
    assert error.code is RPCErrorCode.SERVICE_UNAVAILABLE
    assert error.retryable is True
    assert "redis went away" in error.message


def test_error_from_payload_too_large() -> None:
    error = error_from_exception(RPCPayloadTooLargeError(2000, 1024, "result"))
    assert error.code is RPCErrorCode.PAYLOAD_TOO_LARGE
    assert error.retryable is False


def test_error_from_dramatiq_errors() -> None:
    from dramatiq.errors import ActorNotFound
    from dramatiq.middleware import TimeLimitExceeded

    limit = error_from_exception(TimeLimitExceeded())
    assert limit.code is RPCErrorCode.TIMEOUT
    assert limit.retryable is True
    missing = error_from_exception(ActorNotFound("nope"))
    assert missing.code is RPCErrorCode.METHOD_NOT_FOUND
    assert missing.retryable is False


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ValueError("bad value"), "ValueError: bad value"),
        (KeyError("k"), "KeyError: 'k'"),
        (RuntimeError(), "RuntimeError"),
        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero"),
    ],
)
def test_error_from_generic_exception(exc: Exception, message: str) -> None:
    error = error_from_exception(exc)
    assert type(error) is RPCError
    assert error.code is RPCErrorCode.INTERNAL_ERROR
    assert error.retryable is False
    assert error.message == message
    assert error.details == {"exception": type(exc).__name__}


def test_error_from_exception_truncates_long_text() -> None:
    error = error_from_exception(ValueError("x" * 50_000))
    assert len(error.message) <= protocol.MAX_ERROR_MESSAGE


def test_error_from_exception_with_surrogate_text() -> None:
    error = error_from_exception(ValueError("cannot open /data/\udcff.csv"))
    assert error.code is RPCErrorCode.INTERNAL_ERROR
    encode_response("c", error=error)


# -- deadlines ---------------------------------------------------------------------------------


def test_deadline_from_timeout() -> None:
    assert protocol.deadline_from_timeout(2.5, now=100.0) == 102.5
    assert abs(protocol.deadline_from_timeout(1.0) - (time.time() + 1.0)) < 1.0


@pytest.mark.parametrize(
    ("deadline", "now", "expected"),
    [
        (100.0, 100.001, True),
        (100, 200, True),
        (100.0, 99.999, False),
        (100.0, 100.0, False),
        (None, 1e12, False),
        ("100", 1e12, False),
        (True, 1e12, False),
        ([100], 1e12, False),
    ],
)
def test_deadline_passed(deadline: Any, now: float, expected: bool) -> None:
    assert protocol.deadline_passed(deadline, now=now) is expected


def test_deadline_passed_uses_current_time() -> None:
    assert protocol.deadline_passed(time.time() - 1) is True
    assert protocol.deadline_passed(time.time() + 60) is False


# -- property tests ----------------------------------------------------------------------------


def _check_decode(data: bytes | str, max_bytes: int | None) -> None:
    try:
        response = decode_response(data, max_bytes=max_bytes)
    except DECODE_ERRORS:
        return
    assert isinstance(response, Response)
    assert isinstance(response.correlation_id, str)
    assert isinstance(response.success, bool)
    if response.success:
        assert response.error is None
    else:
        assert isinstance(response.error, RPCError)


@FAST
@given(data=st.binary(max_size=512), max_bytes=st.none() | st.integers(min_value=0, max_value=600))
def test_property_decode_arbitrary_bytes(data: bytes, max_bytes: int | None) -> None:
    _check_decode(data, max_bytes)


@FAST
@given(data=st.text(max_size=512))
def test_property_decode_arbitrary_text(data: str) -> None:
    _check_decode(data, None)


# JSON values within normal ranges (no lone surrogates, no giant integers, shallow nesting: those
# inputs have their own tests above).
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "correlation_id": _json_values | st.text(max_size=40),
        "timestamp": _json_values,
        "success": _json_values | st.booleans(),
        "result": _json_values,
        "error": _json_values | st.text(max_size=40),
        "error_code": _json_values | st.sampled_from([c.value for c in RPCErrorCode] + ["QUOTA", "x"]),
        ERROR_DETAILS_EXTENSION: _json_values
        | st.fixed_dictionaries(
            {},
            optional={"retryable": _json_values, "retry_after": _json_values, "details": _json_values},
        ),
    },
)


@FAST
@given(envelope=_envelopes, ascii_only=st.booleans())
def test_property_decode_json_shaped_garbage(envelope: dict[str, Any], ascii_only: bool) -> None:
    _check_decode(json.dumps(envelope, ensure_ascii=ascii_only), None)


_details = st.dictionaries(
    st.text(max_size=12),
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    max_size=6,
)


@FAST
@given(
    code=st.sampled_from(list(RPCErrorCode)),
    message=st.text(max_size=200),
    retryable=st.none() | st.booleans(),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e6),
    details=_details,
    correlation_id=st.uuids().map(str),
)
def test_property_error_round_trip(
    code: RPCErrorCode,
    message: str,
    retryable: bool | None,
    retry_after: float | None,
    details: dict[str, Any],
    correlation_id: str,
) -> None:
    error = RPCError.from_wire(
        code.value, message, retryable=retryable, retry_after=retry_after, details=details
    )
    response = decode_response(encode_response(correlation_id, error=error, extended=True))
    assert response.correlation_id == correlation_id
    assert response.success is False
    got = response.error
    assert got is not None
    assert got.code is code
    assert got.message == (message or code.value)
    expected_retryable = (code in DEFAULT_RETRYABLE_CODES) if retryable is None else retryable
    assert got.retryable is expected_retryable
    assert got.retry_after == retry_after
    assert got.details == details
    assert got.raw_code is None
