"""Request envelope codec: round trips, strict checks, and garbage never escapes as anything
but RequestDecodeError."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from rpc_tasks import protocol
from rpc_tasks.protocol import RequestDecodeError, decode_request, encode_request

methods = st.from_regex(r"[a-zA-Z0-9_.]{1,40}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


class P(BaseModel):
    text: str
    n: int


@settings(max_examples=200, deadline=None)
@given(
    method=methods,
    params=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    timeout=st.integers(0, 300),
    ext=st.booleans(),
)
def test_round_trip(method: str, params: dict, timeout: int, ext: bool) -> None:
    raw = encode_request(
        method,
        params,
        reply_to="list:response:abc",
        timeout=timeout,
        correlation_id="abc",
        extensions={"error_details"} if ext else (),
    )
    req = decode_request(raw)
    assert (req.method, req.params, req.timeout, req.reply_to) == (
        method,
        params,
        timeout,
        "list:response:abc",
    )
    assert req.wants_error_details is ext
    assert req.is_fire_and_forget is (timeout == 0)
    assert set(json.loads(raw)) >= {"correlation_id", "timestamp", "method", "reply_to", "timeout", "params"}


def _should_accept(obj: object) -> bool:
    """The README's request rules, written independently of the decoder: a JSON object with a
    non-empty correlation_id (<= 128 chars), a method matching ^[a-zA-Z0-9_.]+$ (<= 256), an
    integer timeout 0..300, an ISO-8601 timestamp, reply_to a string (or absent/null) and
    required when timeout > 0, params an object (or absent/null)."""
    if not isinstance(obj, dict):
        return False
    cid, method, timeout = obj.get("correlation_id"), obj.get("method"), obj.get("timeout")
    if not (isinstance(cid, str) and 0 < len(cid) <= 128):
        return False
    if not (isinstance(method, str) and len(method) <= 256 and re.fullmatch(r"[a-zA-Z0-9_.]+", method)):
        return False
    if not (type(timeout) is int and 0 <= timeout <= 300):
        return False
    stamp = obj.get("timestamp")
    if not isinstance(stamp, str) or len(stamp) > 64:
        return False
    try:
        datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return False
    reply_to = obj.get("reply_to")
    if reply_to is not None and not isinstance(reply_to, str):
        return False
    if timeout > 0 and not reply_to:
        return False
    return obj.get("params") is None or isinstance(obj.get("params"), dict)


VALID = {
    "correlation_id": "c1",
    "timestamp": "2026-01-01T00:00:00Z",
    "method": "send_notification",
    "reply_to": "list:response:c1",
    "timeout": 5,
    "params": {"user_id": "42"},
}


def _check_decision(raw: bytes | str, obj: object) -> None:
    if _should_accept(obj):
        assert isinstance(obj, dict)
        req = decode_request(raw)
        assert (req.correlation_id, req.method, req.timeout) == (
            obj["correlation_id"],
            obj["method"],
            obj["timeout"],
        )
        assert req.params == (obj.get("params") or {})
        assert req.reply_to == obj.get("reply_to")
    else:
        with pytest.raises(RequestDecodeError):
            decode_request(raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), json_values.map(lambda v: json.dumps(v))))
def test_garbage_is_rejected_with_request_decode_error(data: bytes | str) -> None:
    try:
        obj = json.loads(data)
    except ValueError:
        with pytest.raises(RequestDecodeError):
            decode_request(data)
        return
    _check_decision(data, obj)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["correlation_id", "timestamp", "method", "reply_to", "timeout", "params", "extensions"]
        ),
        json_values,
        max_size=7,
    )
)
def test_wrong_shapes_are_rejected_with_request_decode_error(obj: dict) -> None:
    _check_decision(json.dumps(obj).encode(), obj)


_field_values = {
    "correlation_id": st.sampled_from(["", "c" * 128, "c" * 129, None, 5, "ok"]),
    "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01 00:00:00", "yesterday", "", None, 0]),
    "method": st.sampled_from(["a.b_c", "bad name", "x" * 256, "x" * 257, "", None, ["m"]]),
    "reply_to": st.sampled_from(["list:response:c1", "", None, 3]),
    "timeout": st.sampled_from([0, 1, 300, 301, -1, 5.0, True, "5", None]),
    "params": st.sampled_from([{}, {"a": 1}, None, [], "p", 1]),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_field_values)).flatmap(lambda k: st.tuples(st.just(k), _field_values[k])))
def test_one_field_changed_is_accepted_or_rejected_as_documented(change: tuple[str, object]) -> None:
    """Near-valid requests (one field changed or dropped): both decisions occur, so a decoder
    that accepts everything, or nothing, fails."""
    key, value = change
    obj = {**VALID, key: value}
    _check_decision(json.dumps(obj).encode(), obj)
    dropped = {k: v for k, v in VALID.items() if k != key}
    _check_decision(json.dumps(dropped).encode(), dropped)


def test_near_valid_requests_cover_both_decisions() -> None:
    assert _should_accept(VALID)
    decode_request(json.dumps(VALID))
    assert not _should_accept({**VALID, "timeout": True})
    assert not _should_accept({**VALID, "reply_to": None})
    assert _should_accept({**VALID, "reply_to": None, "timeout": 0})
    assert _should_accept({**VALID, "params": None})


def test_encode_validates_method_timeout_and_size() -> None:
    with pytest.raises(ValueError):
        encode_request("bad name", {}, reply_to="r", timeout=1, correlation_id="c")
    with pytest.raises(ValueError):
        encode_request("ok\n", {}, reply_to="r", timeout=1, correlation_id="c")
    with pytest.raises(ValueError):
        encode_request("ok", {}, reply_to="r", timeout=301, correlation_id="c")
    with pytest.raises(protocol.RPCPayloadTooLargeError):
        encode_request("ok", {"x": "y" * 5000}, reply_to="r", timeout=1, correlation_id="c", max_bytes=1024)
    raw = encode_request("ok", P(text="é", n=1), reply_to="r", timeout=1, correlation_id="c")
    assert json.loads(raw)["params"] == {"text": "é", "n": 1}
    assert "extensions" not in json.loads(raw)


def test_decode_keeps_reply_address_of_bad_requests() -> None:
    bad = json.dumps(
        {
            "correlation_id": "c1",
            "reply_to": "list:response:c1",
            "method": "x y",
            "timeout": 5,
            "timestamp": "2026-01-01T00:00:00Z",
            "params": {},
        }
    )
    with pytest.raises(RequestDecodeError) as info:
        decode_request(bad.encode())
    assert info.value.reply_to == "list:response:c1" and info.value.correlation_id == "c1"
    with pytest.raises(RequestDecodeError):
        decode_request(None)


def test_expiry_and_wire_timeout() -> None:
    raw = encode_request("m", {}, reply_to="r", timeout=2, correlation_id="c")
    req = decode_request(raw)
    assert not req.expired()
    assert req.expired(datetime.now(timezone.utc) + timedelta(seconds=3))
    ff = decode_request(encode_request("m", {}, reply_to="r", timeout=0, correlation_id="c"))
    assert not ff.expired(datetime.now(timezone.utc) + timedelta(days=1))
    assert protocol.wire_timeout(0.25) == 1 and protocol.wire_timeout(2.01) == 3
    assert protocol.wire_timeout(10_000) == 300
