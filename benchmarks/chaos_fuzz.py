"""Seeded random malformed input for the fault suite: Dramatiq queue messages (raw bytes as
stored in ``<ns>:<queue>.msgs``) and Streams request entries."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

_BAD_OPTIONS: list[dict[str, Any]] = [
    {"throws": "ValueError"},
    {"throws": ["x"]},
    {"retry_when": "always"},
    {"retries": "x"},
    {"retries": -1},
    {"max_retries": "3"},
    {"min_backoff": "x"},
    {"max_backoff": [1]},
    {"retry_codes": 5},
    {"retry_codes": [1, 2]},
    {"jitter": "lots"},
    {"time_limit": "1s"},
    {"rpc_deadline": "soon"},
    {"rpc_reply_to": 7},
    {"rpc_attempt": "first"},
    {"pipe_target": 5},
    {"pipe_target": {"actor_name": "x"}},
    {"on_retry_exhausted": 3},
    {"idempotency_key": 9},
    {"max_postpone": "x"},
]


def _message(queue: str, job_id: str, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "queue_name": queue,
        "actor_name": "chaos_plain",
        "args": [{"id": job_id, "work_ms": 1}],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1,
    }
    fields.update(changes)
    return fields


def _junk(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(7 if depth < 3 else 4)
    if choice == 0:
        return rng.randint(-(2**70), 2**70)
    if choice == 1:
        return rng.random() * 1e300
    if choice == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(20)))
    if choice == 3:
        return rng.choice([None, True, False])
    if choice == 4:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_junk(rng, depth + 1))[:20]: _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def queue_payloads(
    rng: random.Random, count: int, queue: str, batch: int, reply_prefix: str = "chaos:resp:"
) -> Iterator[tuple[bytes | None, str | None]]:
    """``count`` (raw message or ``None`` for an id without data, the job id it carries if
    any) pairs. Some are runnable: a valid message without ``redis_message_id``, or one whose
    mangled field still makes a valid message."""
    for i in range(count):
        kind = rng.randrange(10)
        job_id = f"fuzz-{batch}-{i}-{uuid.uuid4().hex[:6]}"
        reply = {"rpc_reply_to": f"{reply_prefix}{uuid.uuid4().hex}"} if rng.random() < 0.3 else {}
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(200))), None
        elif kind == 1:
            yield json.dumps(_junk(rng)).encode(), None
        elif kind == 2:
            fields = _message(queue, job_id, options=reply)
            del fields[rng.choice(list(fields))]
            yield json.dumps(fields).encode(), job_id
        elif kind == 3:
            fields = _message(queue, job_id)
            fields[rng.choice(list(fields))] = _junk(rng)
            if fields.get("queue_name") == queue and fields.get("actor_name") == "chaos_plain":
                fields["options"] = (
                    {**reply, **rng.choice(_BAD_OPTIONS)}
                    if isinstance(fields.get("options"), dict)
                    else fields["options"]
                )
            yield json.dumps(fields).encode(), job_id
        elif kind == 4:
            yield (
                json.dumps(_message(queue, job_id, options={**reply, **rng.choice(_BAD_OPTIONS)})).encode(),
                None,
            )
        elif kind == 5:
            yield json.dumps(_message("another_queue", job_id, options=reply)).encode(), None
        elif kind == 6:
            yield (
                json.dumps(_message(queue, job_id, actor_name="no_such_actor", options=reply)).encode(),
                None,
            )
        elif kind == 7:
            big = "x" * (1_200_000 if rng.random() < 0.02 else 10)
            yield (
                json.dumps(
                    _message(queue, job_id, args=[{"id": job_id, "pad": big}], options=reply)
                ).encode(),
                None,
            )
        elif kind == 8:
            yield None, None
        else:
            yield json.dumps(_message(queue, job_id, options={})).encode(), job_id


def stream_entries(
    rng: random.Random, count: int, reply_prefix: str = "chaos:resp:"
) -> Iterator[dict[str, Any]]:
    """``count`` malformed request entries for the Streams request stream."""
    for _ in range(count):
        kind = rng.randrange(6)
        reply = f"{reply_prefix}{uuid.uuid4().hex}"
        if kind == 0:
            yield {"payload": bytes(rng.randrange(256) for _ in range(rng.randrange(100)))}
        elif kind == 1:
            yield {str(_junk(rng))[:10] or "k": json.dumps(_junk(rng))}
        elif kind == 2:
            yield {"payload": json.dumps(_junk(rng))}
        elif kind == 3:
            request = {
                "correlation_id": uuid.uuid4().hex,
                "method": "chaos_echo",
                "reply_to": reply,
                "timeout": 5,
                "params": _junk(rng),
            }
            yield {"payload": json.dumps(request)}
        elif kind == 4:
            request = {"correlation_id": _junk(rng), "method": _junk(rng), "reply_to": reply, "params": {}}
            yield {"payload": json.dumps(request)}
        else:
            request = {
                "correlation_id": uuid.uuid4().hex,
                "method": "no.such.method",
                "reply_to": reply,
                "timeout": 5,
                "params": {},
            }
            yield {"payload": json.dumps(request)}
