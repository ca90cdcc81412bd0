"""Request envelope codec: round trips, strict checks, and garbage never escapes as anything
but RequestDecodeError."""

from __future__ import annotations

import json
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


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), json_values.map(lambda v: json.dumps(v))))
def test_garbage_only_raises_request_decode_error(data: object) -> None:
    try:
        decode_request(data)  # type: ignore[arg-type]
    except RequestDecodeError:
        pass


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
def test_wrong_shapes_only_raise_request_decode_error(obj: dict) -> None:
    try:
        decode_request(json.dumps(obj).encode())
    except RequestDecodeError:
        pass


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
