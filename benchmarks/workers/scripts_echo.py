"""Dramatiq-scripts floor, server side: the round trips of a ``.call()`` on
``BlockingRedisBroker`` without Dramatiq's ``Worker``, middleware or validation.

    python -m benchmarks.workers.scripts_echo --max-seconds 600

One thread, one kept connection: ``BLPOP <queue>.wake`` pipelined with Dramatiq's fetch script
(as the consumer does), JSON-decode the message, then the ack script that also pushes the reply
(as the worker thread does). It measures what Dramatiq's data model (its Lua scripts, the
message JSON) costs over the raw floor, so that the rest of ``call``'s time can be put down to
the worker (thread hand-over, middleware, validation). Exits on SIGTERM/SIGINT or after
``--max-seconds``.
"""

from __future__ import annotations

import json

from benchmarks.common import echo_worker_running, names, redis_url
from rpc_tasks.redis.broker import BlockingRedisBroker, wake_key
from rpc_tasks.redis.connection import pipelined

KIND = "scripts"
#: Seconds the reply key lives (as the rpc-tasks default).
REPLY_TTL = 60


def broker() -> BlockingRedisBroker:
    """The broker whose scripts both sides use (namespace and queue of this benchmark run)."""
    n = names()
    b = BlockingRedisBroker(url=redis_url(), namespace=n.namespace(KIND))
    b.declare_queue(n.queue(KIND))
    return b


def main() -> int:
    running = echo_worker_running()
    b = broker()
    queue = names().queue(KIND)
    fetch = b.scripts["dispatch"]
    ack = b.scripts["dispatch_rpc"]
    for script in (fetch, ack):  # load both scripts, so that EVALSHA finds them
        script(keys=[b.namespace], args=b._dispatch_args("fetch", queue, 0))
    while running():
        commands = [
            ("BLPOP", wake_key(b.namespace, queue), 1),
            ("EVALSHA", fetch.sha, 1, b.namespace, *b._dispatch_args("fetch", queue, 1)),
        ]
        for data in pipelined(b.client, commands, pinned=True, wait=1)[1] or []:
            message = json.loads(data)
            options = message["options"]
            reply = json.dumps({"result": message["args"][0]}).encode()
            rid, key = options["redis_message_id"], options["reply_to"]
            full = b._dispatch_args("ack", queue, rid, key, reply, REPLY_TTL)
            pipelined(b.client, [("EVALSHA", ack.sha, 1, b.namespace, *full)], pinned=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
