"""The django-cfg client double enforces the rules it claims to (so tests built on it can fail)."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from tests.integration.legacy_client import EchoResult, LegacyRemoteError, parse_reply


def reply(**over: object) -> str:
    body: dict[str, object] = {
        "correlation_id": str(uuid.uuid4()),
        "timestamp": "2026-01-01T00:00:00.000Z",
        "success": False,
        "result": None,
        "error": "boom",
        "error_code": "internal_error",
    }
    body.update(over)
    return json.dumps(body)


def test_double_accepts_a_legacy_error_and_a_legacy_success() -> None:
    with pytest.raises(LegacyRemoteError) as info:
        parse_reply(reply(), EchoResult)
    assert info.value.error.code.value == "internal_error"
    ok = parse_reply(
        reply(success=True, error=None, error_code=None, result={"echoed": "x", "length": 1}), EchoResult
    )
    assert ok.echoed == "x"


@pytest.mark.parametrize(
    "over",
    [
        {"error_details": {"retryable": False}},  # an extra key
        {"correlation_id": "unknown"},  # not a UUID
        {"error_code": "invalid_request"},  # outside its enum
        {"error_code": "payload_too_large"},
        {"error": "x" * 501},  # over its 500 characters
        {"success": True, "error": None, "error_code": None, "result": {"message": "no echoed/length"}},
    ],
)
def test_double_rejects_what_the_real_client_rejects(over: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        parse_reply(reply(**over), EchoResult)


def test_double_treats_a_null_success_result_as_a_remote_error() -> None:
    with pytest.raises(LegacyRemoteError, match="result is None"):
        parse_reply(reply(success=True, error=None, error_code=None, result=None), EchoResult)
