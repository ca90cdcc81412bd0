"""Dramatiq's ``dispatch.lua``, wrapped for :class:`~rpc_tasks.redis.broker.BlockingRedisBroker`
(loaded from the installed Dramatiq, never copied), and the shape of what its fetch returns."""

from __future__ import annotations

from typing import Any

import redis

from . import internals
from .connection import pipelined

#: Wake-up tokens kept per queue (more would only cause empty fetches).
WAKE_LIST_LENGTH = 64


def rpc_dispatch_source() -> bytes:
    """Dramatiq's own ``dispatch.lua`` (loaded from the installed package, not copied), wrapped
    so that, atomically with the wrapped command,

    * an ``enqueue`` also pushes a capped wake-up token;
    * an ``ack`` given three extra arguments (reply key, reply, TTL in seconds) also pushes
      that ``.call()`` reply with its TTL (``LPUSH`` + ``EXPIRE``), only when this ack
      really removed the message from this worker's ack set (an ack sent again after a lost
      reply pushes nothing twice), the ``EXPIRE`` only when the ``LPUSH`` succeeded; when it
      did not (e.g. the key holds another type) the ack still happens and the script
      returns ``'rpc_reply_failed: <error>'``);
    * a ``fetch`` given ``'ids'`` as second argument returns ``{ids, messages}``: the Redis ids
      of the fetched messages as well as their data (the ids are the head of the queue the
      fetch pops; maintenance is off for such a fetch so nothing is pushed in between).
    """
    body = internals.dispatch_script()
    return (
        b"local function rpc_tasks_dispatch()\n" + body + b"\nend\n"
        b"local fetched_ids = nil\n"
        b"if ARGV[1] == 'fetch' and ARGV[10] == 'ids' then\n"
        b"  ARGV[7] = '0'\n"
        b"  local n = math.min(tonumber(ARGV[9]), tonumber(ARGV[8]))\n"
        b"  fetched_ids = redis.call('lrange', KEYS[1] .. ':' .. ARGV[3], 0, n - 1)\n"
        b"end\n"
        b"local was_unacked = 0\n"
        b"if ARGV[1] == 'ack' and ARGV[12] then\n"
        b"  local acks = KEYS[1] .. ':__acks__.' .. ARGV[4] .. '.' .. ARGV[3]\n"
        b"  was_unacked = redis.call('sismember', acks, ARGV[9])\n"
        b"end\n"
        b"local result = rpc_tasks_dispatch()\n"
        b"if fetched_ids then\n"
        b"  return {fetched_ids, result}\n"
        b"elseif ARGV[1] == 'enqueue' then\n"
        b"  local wake = KEYS[1] .. ':' .. ARGV[3] .. '.wake'\n"
        b"  redis.call('lpush', wake, '1')\n"
        b"  redis.call('ltrim', wake, 0, " + str(WAKE_LIST_LENGTH - 1).encode() + b")\n"
        b"elseif ARGV[1] == 'ack' and ARGV[12] and was_unacked == 1 then\n"
        b"  local pushed = redis.pcall('lpush', ARGV[10], ARGV[11])\n"
        b"  if type(pushed) == 'table' and pushed.err then\n"
        b"    return 'rpc_reply_failed: ' .. pushed.err\n"
        b"  end\n"
        b"  redis.call('expire', ARGV[10], ARGV[12])\n"
        b"end\n"
        b"return result\n"
    )


def fetched_pairs(result: Any) -> list[tuple[str, bytes | None]]:
    """The ``{ids, messages}`` reply of a fetch with ids, as (id, data) pairs."""
    if not result:
        return []
    ids, messages = result[0] or [], result[1] or []
    return [
        (rid.decode() if isinstance(rid, bytes) else str(rid), data)
        for rid, data in zip(ids, list(messages) + [None] * (len(ids) - len(messages)), strict=False)
    ]


def enqueue_replicated(broker: Any, script: Any, enqueue: tuple[Any, ...]) -> Any:
    """Run a ``BlockingRedisBroker`` enqueue command and ``WAIT wait_replicas wait_timeout_ms``
    on one connection (one write): returns once that many replicas have the message, so a
    failover to one of them cannot lose it. Fewer in time: ``redis.ConnectionError`` (the caller
    sees ``RPCConnectionError``; the message *is* enqueued on the master, so sending it again
    may run it twice)."""
    wait = ("WAIT", broker.wait_replicas, broker.wait_timeout_ms)
    try:
        result, acked = pipelined(broker.client, [enqueue, wait])
    except redis.exceptions.NoScriptError:  # the server lost its script cache: load, send again
        broker.client.script_load(script.script)
        result, acked = pipelined(broker.client, [enqueue, wait])
    if int(acked) < broker.wait_replicas:
        raise redis.ConnectionError(
            f"enqueued, but {acked} of {broker.wait_replicas} replicas confirmed it within "
            f"{broker.wait_timeout_ms} ms (wait_replicas)"
        )
    return result
