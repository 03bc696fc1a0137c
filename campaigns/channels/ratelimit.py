"""Per-channel rate limits shared by every worker: a token bucket in Redis (one Lua call).

A worker asks for the tokens of a whole chunk at once and gets how many it may send
now and how long to wait for the next one, so pacing costs one round trip per chunk,
not per message. Redis's clock is used, so workers' clocks need not agree.
"""

from __future__ import annotations

import time
from typing import Any

import redis

_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local data = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(data[1])
local ts = tonumber(data[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if granted < want then wait = math.ceil((1 - tokens) / rate * 1000) end
return {granted, wait}
"""


class RateLimiter:
    def __init__(self, connection: redis.Redis, prefix: str = "patron:rate:") -> None:
        self.connection = connection
        self.prefix = prefix
        self._script: Any = connection.register_script(_SCRIPT)

    def try_acquire(self, name: str, rate: float, want: int) -> tuple[int, float]:
        """Take up to `want` tokens: (granted, seconds until the next token if short)."""
        burst = max(1.0, rate)
        granted, wait_ms = self._script(keys=[self.prefix + name], args=[rate, burst, want])
        return int(granted), int(wait_ms) / 1000.0

    def acquire(self, name: str, rate: float, want: int, max_wait: float = 30.0) -> int:
        """Block until at least one token is granted (or `max_wait` passed); return the count."""
        deadline = time.monotonic() + max_wait
        while True:
            granted, wait = self.try_acquire(name, rate, want)
            if granted or time.monotonic() >= deadline:
                return granted
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())) or 0.01)
