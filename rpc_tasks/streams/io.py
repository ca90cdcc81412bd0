"""Every Redis call of the Streams protocol: requests, consumer groups, replies, acks, dead
letters and Pub/Sub broadcasts (client and server side)."""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import RedisError

from ..exceptions import RPCConnectionError
from ..redis.connection import blocking_command, pipelined

StreamEntry = tuple[str, dict[str, bytes]]


def _entry(raw: Any) -> StreamEntry:
    entry_id, fields = raw
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    out: dict[str, bytes] = {}
    for k, v in (fields or {}).items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = v if isinstance(v, bytes) else str(v).encode()
    return eid, out


class StreamIO:
    """Every Redis call of the Streams protocol: requests, consumer groups, replies, acks,
    dead letters and Pub/Sub broadcasts."""

    def __init__(
        self, client: redis.Redis, *, reply_ttl: int = 60, dead_maxlen: int = 100_000, pin: bool = False
    ) -> None:
        self.client = client
        self.reply_ttl = reply_ttl
        self.dead_maxlen = dead_maxlen
        #: Server side: run :meth:`read` and :meth:`finish` on a connection each (long-lived)
        #: thread keeps, instead of a pool checkout per command. Needs a pool with room for
        #: one connection per server thread.
        self.pin = pin

    def _fail(self, what: str, exc: Exception) -> RPCConnectionError:
        return RPCConnectionError(f"Redis {what} failed: {exc}")

    # client side
    def add_request(self, stream: str, payload: bytes, maxlen: int) -> str:
        """``XADD stream MAXLEN ~ maxlen * payload <json>``; returns the entry id."""
        try:
            entry_id = self.client.xadd(stream, {"payload": payload}, maxlen=maxlen, approximate=True)
        except RedisError as exc:
            raise self._fail("XADD", exc) from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    @staticmethod
    def request_command(stream: str, payload: bytes, maxlen: int) -> tuple[Any, ...]:
        """The ``XADD`` of :meth:`add_request` as a raw command, to send ahead of the reply's
        ``BLPOP`` in one write (:meth:`ReplyChannel.wait` ``first=``)."""
        return ("XADD", stream, "MAXLEN", "~", maxlen, "*", "payload", payload)

    def failed(self, what: str, exc: Exception) -> RPCConnectionError:
        """The :class:`RPCConnectionError` for a failed ``what`` (secrets redacted)."""
        return self._fail(what, exc)

    def publish(self, channel: str, data: bytes) -> int:
        """``PUBLISH``; returns the number of subscribers that got it."""
        try:
            return int(self.client.publish(channel, data))
        except RedisError as exc:
            raise self._fail("PUBLISH", exc) from exc

    # server side
    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (reading from the start) and the stream if missing."""
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise self._fail("XGROUP CREATE", exc) from exc
        except RedisError as exc:
            raise self._fail("XGROUP CREATE", exc) from exc

    def read(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        """New entries for ``consumer`` (``XREADGROUP ... >``), blocking up to ``block_ms``."""
        command = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block_ms)
        try:
            args = (*command, "STREAMS", stream, ">")
            got: Any = blocking_command(self.client, *args, wait=block_ms / 1000, pinned=self.pin)
        except RedisError as exc:
            raise self._fail("XREADGROUP", exc) from exc
        # RESP2: [[stream, [entry, ...]]]; RESP3 (protocol=3): {stream: [[entry, ...]]}.
        streams = (
            [items[0] if items else [] for items in got.values()]
            if isinstance(got, dict)
            else [items for _name, items in got or []]
        )
        entries: list[StreamEntry] = []
        for items in streams:
            entries.extend(_entry(item) for item in items if item and item[1] is not None)
        return entries

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[StreamEntry], list[str]]:
        """``XAUTOCLAIM``: take over entries idle longer than ``min_idle_ms``. Returns
        ``(next_start, entries, deleted_ids)``; deleted ids were trimmed away while pending."""
        try:
            raw = self.client.xautoclaim(stream, group, consumer, min_idle_ms, start_id=start, count=count)
        except RedisError as exc:
            raise self._fail("XAUTOCLAIM", exc) from exc
        next_start = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        entries = [_entry(item) for item in raw[1] if item and item[1] is not None]
        deleted_raw = list(raw[2]) if len(raw) > 2 else []
        deleted = [d.decode() if isinstance(d, bytes) else str(d) for d in deleted_raw]
        deleted += [(i.decode() if isinstance(i, bytes) else str(i)) for i, f in raw[1] if f is None]
        return next_start, entries, deleted

    def touch(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer is still working on (``XCLAIM ...
        JUSTID``, which does not count as a delivery), so nobody reclaims them."""
        if not entry_ids:
            return
        try:
            ids: list[Any] = list(entry_ids)
            self.client.xclaim(stream, group, consumer, 0, ids, justid=True)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):  # no group (e.g. Redis lost its data): nothing to touch
                raise self._fail("XCLAIM", exc) from exc
        except RedisError as exc:
            raise self._fail("XCLAIM", exc) from exc

    def deliveries(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> dict[str, int]:
        """How many times each entry was delivered, for the entries still pending *for
        ``consumer``* (``XPENDING stream group id id 1`` per entry, all in one round trip, so
        other consumers' pending entries never crowd them out). An entry missing from the
        answer was acked, or taken over by another consumer, since it was claimed."""
        if not entry_ids:
            return {}
        commands: list[tuple[Any, ...]] = [("XPENDING", stream, group, i, i, 1) for i in entry_ids]
        try:
            replies = pipelined(self.client, commands)
        except RedisError as exc:
            raise self._fail("XPENDING", exc) from exc
        out: dict[str, int] = {}
        for entry_id, rows in zip(entry_ids, replies, strict=True):
            for row in rows or []:
                owner = row[1].decode() if isinstance(row[1], bytes) else str(row[1])
                if owner == consumer:
                    out[entry_id] = int(row[3])
        return out

    def finish(
        self,
        stream: str,
        group: str,
        entry_id: str,
        reply_to: str | None = None,
        payload: bytes | None = None,
    ) -> str:
        """``XACK`` the entry and push its reply (if any), atomically (one script), on this
        thread's own connection when pinned. Returns what happened:

        * ``"acked"``: acked, no reply asked for;
        * ``"replied"``: acked, reply pushed with its TTL (``LPUSH`` + ``EXPIRE``);
        * ``"not_pending"``: someone acked it first (nothing pushed: no duplicate reply);
        * ``"wrongtype"``: acked, but ``reply_to`` holds something other than a list, so no
          reply was pushed and the key was left as it was (no ``EXPIRE``).

        Raises :class:`RPCConnectionError` when the script did not run (the entry stays
        pending). Running it twice is harmless (the second run finds it acked)."""
        if reply_to is None or payload is None:
            command: tuple[Any, ...] = ("XACK", stream, group, entry_id)
        else:
            command = ("EVAL", _FINISH, 2, stream, reply_to, group, entry_id, payload, self.reply_ttl, 0)
        try:
            reply = pipelined(self.client, [command], pinned=self.pin)[0]
        except RedisError as exc:
            raise self._fail("reply/XACK", exc) from exc
        if command[0] == "XACK":
            return "acked" if int(reply) else "not_pending"
        return _outcome(reply)

    def dead_letter(
        self,
        stream: str,
        group: str,
        entry_id: str,
        dead_stream: str,
        fields: dict[str, Any],
        reply_to: str | None = None,
        payload: bytes | None = None,
    ) -> str:
        """Copy an entry to ``dead_stream`` with the reason, reply (if possible) and ``XACK``,
        all in one script (atomic). Returns the reply outcome as :meth:`finish` does (the copy
        is made even when the entry was no longer pending, e.g. trimmed)."""
        flat: list[Any] = []
        for key, value in fields.items():
            flat += [key, value]
        command = (
            "EVAL",
            _FINISH,
            3,
            stream,
            reply_to if reply_to is not None and payload is not None else stream,
            dead_stream,
            group,
            entry_id,
            payload if reply_to is not None and payload is not None else b"",
            self.reply_ttl,
            max(1, self.dead_maxlen),
            *flat,
        )
        try:
            reply = pipelined(self.client, [command])[0]
        except RedisError as exc:
            raise self._fail("dead-letter", exc) from exc
        return _outcome(reply)

    def backlog(self, stream: str, group: str) -> tuple[int, int]:
        """``(pending, lag)`` of the group (lag = entries not yet delivered; -1 if unknown)."""
        try:
            for info in self.client.xinfo_groups(stream):
                name = info.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                if name == group:
                    lag = info.get("lag")
                    return int(info.get("pending", 0)), int(lag) if lag is not None else -1
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0, 0
            raise self._fail("XINFO GROUPS", exc) from exc
        except RedisError as exc:
            raise self._fail("XINFO GROUPS", exc) from exc
        return 0, -1


#: ``XACK`` + (optional) dead-letter copy + (optional) reply, in one script.
#: KEYS: stream, reply key (the stream itself when there is no reply), [dead stream].
#: ARGV: group, entry id, reply payload ('' = none), reply TTL, dead MAXLEN (0 = no copy), fields...
#: The ``XACK`` comes first: a replay (or a second finisher) finds the entry acked and pushes
#: nothing; and it is the script's first write, so Redis over ``maxmemory`` does not stop the
#: script half-way. The reply is pushed (with its ``EXPIRE``) only onto a list or a free key.
_FINISH = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[5]) > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
elseif acked == 0 then
  return 'not_pending'
end
if ARGV[3] == '' then
  return 'acked'
end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return 'wrongtype'
end
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 'replied'
"""


def _outcome(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
