"""A fake rate-limited remote service shared by every worker process (state in Redis).

It serves ``budget`` calls, then answers "rate limited, retry after ``block_ms``" and refuses
everything until the block ends. Every call is logged with its arrival time (Redis server
time) and outcome, so tests can check that no call arrived while the remote was blocking.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

_CALL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local budget = tonumber(ARGV[1])
local block_ms = tonumber(ARGV[2])
local caller = ARGV[3]
local blocked_until = tonumber(redis.call('GET', KEYS[1]) or '0')
local block_start = tonumber(redis.call('GET', KEYS[4]) or '0')
if now < blocked_until then
  redis.call('RPUSH', KEYS[3], now .. ':during_block:' .. block_start .. ':' .. caller)
  return {0, blocked_until - now}
end
local used = redis.call('INCR', KEYS[2])
if used > budget then
  redis.call('SET', KEYS[1], now + block_ms)
  redis.call('SET', KEYS[4], now)
  redis.call('SET', KEYS[2], 0)
  redis.call('RPUSH', KEYS[3], now .. ':limited:' .. now .. ':' .. caller)
  return {0, block_ms}
end
redis.call('RPUSH', KEYS[3], now .. ':ok:0:' .. caller)
return {1, 0}
"""


@dataclass
class Call:
    at_ms: int
    outcome: str  # ok | limited | during_block
    block_start_ms: int
    caller: str


class FakeRemote:
    def __init__(self, url: str, name: str = "remote", budget: int = 5, block_ms: int = 1000) -> None:
        self.client = redis.Redis.from_url(url)
        self.name = name
        self.budget = budget
        self.block_ms = block_ms
        self._script = self.client.register_script(_CALL)

    def _keys(self) -> list[str]:
        n = self.name
        return [f"{n}:blocked_until", f"{n}:used", f"{n}:log", f"{n}:block_start"]

    def call(self, caller: str) -> tuple[bool, float]:
        """``(True, 0)`` when served, ``(False, retry_after_seconds)`` when rate limited."""
        ok, wait_ms = self._script(keys=self._keys(), args=[self.budget, self.block_ms, caller])
        return bool(ok), int(wait_ms) / 1000.0

    def log(self) -> list[Call]:
        out = []
        for raw in self.client.lrange(self._keys()[2], 0, -1):
            at, outcome, start, caller = raw.decode().split(":", 3)
            out.append(Call(int(at), outcome, int(start), caller))
        return out
