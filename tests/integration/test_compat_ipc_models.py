"""What we write, checked with django-ipc 1.0.9's own models (which django-cfg's original client
uses too), run in django-ipc's venv; and the client double agrees with them on replies."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from rpc_tasks import (
    BatchNotificationRequest,
    BroadcastRequest,
    BroadcastResponse,
    BroadcastTarget,
    NotificationRequest,
    NotificationResponse,
    RPCError,
    RPCErrorCode,
    protocol,
)
from rpc_tasks.streams.builtins import EchoParams, echo

from . import legacy_client as legacy
from .test_compat_ipc_server import IPC_PYTHON

CHECK = """
import json, sys
from django_ipc import models as m
out = []
for kind, name, raw in json.load(sys.stdin):
    try:
        if kind == "model":
            getattr(m, name).model_validate_json(raw)
        else:  # a reply, as django-cfg's client reads it
            reply = m.RPCResponse[m.EchoResult](**json.loads(raw))
            if not reply.success:
                m.RPCError(code=reply.error_code or "internal_error", message=reply.error or "Unknown error")
        out.append("ok")
    except Exception as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


def ipc_verdicts(items: list[tuple[str, str, str]]) -> list[str]:
    if not IPC_PYTHON.exists():
        pytest.fail(f"django-ipc's venv is missing ({IPC_PYTHON}); run `make install`", pytrace=False)
    done = subprocess.run(
        [str(IPC_PYTHON), "-c", CHECK],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_what_we_write_is_valid_for_django_ipcs_models() -> None:
    cases: list[tuple[str, Any]] = [
        (
            "NotificationRequest",
            NotificationRequest(user_id="42", notification_type="order_update", title="T", message="M"),
        ),
        ("BroadcastRequest", BroadcastRequest(event_type="system_update", payload={"v": 2})),
        (
            "BroadcastRequest",
            BroadcastRequest(target="room", room="r1", event_type="news", title="T", message="M"),
        ),
        (
            "BatchNotificationRequest",
            BatchNotificationRequest(user_ids=["1", "2"], notification_type="a", title="t", message="m"),
        ),
        ("NotificationResponse", NotificationResponse(user_id="42", delivered=False, user_connected=False)),
        ("BroadcastResponse", BroadcastResponse(target=BroadcastTarget.ROOM, recipients=2, room="r1")),
        ("EchoResult", echo(EchoParams(message="health_check"))),
    ]
    items = [("model", name, model.model_dump_json()) for name, model in cases]
    assert ipc_verdicts(items) == ["ok"] * len(items)


def reply_shapes() -> list[str]:
    cid = str(uuid.uuid4())
    shapes = [
        protocol.encode_response(cid, error=RPCError(code=code, message="m" * 3000), extended=False).decode()
        for code in RPCErrorCode
    ]
    shapes.append(protocol.encode_response(cid, result={"echoed": "x", "length": 1}, extended=False).decode())
    shapes.append(
        protocol.encode_response(cid, error=RPCError(message="x"), extended=True).decode()
    )  # ours only
    base = {
        "correlation_id": cid,
        "success": False,
        "result": None,
        "error": "e",
        "error_code": "internal_error",
    }
    for over in (
        {"error": "x" * 501},
        {"error_code": "invalid_request"},
        {"correlation_id": "unknown"},
        {"x": 1},
    ):
        shapes.append(json.dumps({**base, **over}))
    return shapes


def test_client_double_agrees_with_django_ipcs_models_on_replies() -> None:
    shapes = reply_shapes()
    theirs = ipc_verdicts([("reply", "", raw) for raw in shapes])
    ours: list[str] = []
    for raw in shapes:
        try:
            legacy.parse_reply(raw, legacy.EchoResult)
            ours.append("ok")
        except legacy.LegacyRemoteError:
            ours.append("ok")  # a remote error it can read
        except ValidationError:
            ours.append("ValidationError")
    assert ours == theirs
    # every reply to a non-announcing caller is readable; the extended one and the bad ones are not
    n = len(RPCErrorCode) + 1
    assert theirs[:n] == ["ok"] * n and "ok" not in theirs[n:]
