"""Provider limits that hold across every worker process, kept in Redis.

One Lua script decides, atomically, whether a request may go to a provider now:

- a pause after a 429 (``Retry-After``) stops every worker; once it ends, the concurrency cap
  ramps up again over ``RAMP_S`` instead of jumping back to full;
- ``max_concurrency``: a sorted set of leases scored by their expiry, so the share of a worker
  that died is released by expiry instead of leaking (live workers renew their leases, and a
  renewal never brings back a lease that has expired: a worker resuming from a pause must not
  take back a slot another worker may already be using);
- ``rpm`` and ``tpm``: token buckets refilled continuously, started empty and kept small so
  bursts stay well inside the provider's window; they run at ``SAFETY`` of the configured rate.

The script answers how many milliseconds to wait, or 0 (go) / -1 (go, holding a lease). Inside one process, lines waiting
for the same provider queue on an asyncio lock, so only one of them polls Redis at a time.
A provider with no limits configured skips the script unless a pause is on: a worker looks
for one at most every ``PAUSE_CHECK_S``, so a request costs no Redis round trip of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from service.core import keys
from service.core.config import RAMP_S, Provider
from service.core.connections import REDIS_DOWN, Script
from service.core.store import Redis

RAMP_START = 0.1  # fraction of the concurrency cap allowed right after a pause
SAFETY = 0.95
BURST_S = 0.25
MAX_POLL_S = 1.0
# How stale a worker's view of a provider's pause may be (the ramp and every limit stay exact).
PAUSE_CHECK_S = 0.25
# Concurrency cap during the ramp of a provider configured without one.
RAMP_DEFAULT_CONCURRENCY = 64

# How long an admission without a lease is remembered for a re-run (redis-py's retries of one call).
OP_TTL_MS = 5 * 60 * 1000

# KEYS: inflight leases, buckets, pause, this attempt's op key. A re-run after a lost reply must not
# take a second token or slot: a holder that already has a lease goes on with it, and an admission
# without a lease (no concurrency cap) is recorded under the op key.
_ACQUIRE = Script("""
local now = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local holder = ARGV[3]
local maxc = tonumber(ARGV[4])
local rpm = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local cost = tonumber(ARGV[7])
local ramp_ms = tonumber(ARGV[8])

local held = redis.call('ZSCORE', KEYS[1], holder)
if held and tonumber(held) > now then return -1 end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end

local paused_until = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused_until > now then return paused_until - now end
if paused_until > 0 and now - paused_until < ramp_ms then
  local cap = maxc
  if cap == 0 then cap = tonumber(ARGV[9]) end
  local start = tonumber(ARGV[11])
  maxc = math.max(1, math.floor(cap * (start + (1 - start) * (now - paused_until) / ramp_ms)))
end

if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= maxc then return 25 end
end

if rpm > 0 or tpm > 0 then
  local b = redis.call('HMGET', KEYS[2], 'r', 't', 'ts')
  local ts = tonumber(b[3]) or now
  local elapsed = math.max(0, now - ts)
  local r, t = 0, 0
  if rpm > 0 then
    local cap_r = math.max(1, rpm / 60000 * tonumber(ARGV[10]))
    r = math.min(cap_r, (tonumber(b[1]) or 0) + elapsed * rpm / 60000)
    if r < 1 then
      redis.call('HSET', KEYS[2], 'r', r, 't', b[2] or 0, 'ts', now)
      return math.ceil((1 - r) * 60000 / rpm)
    end
  end
  if tpm > 0 then
    local cap_t = math.max(cost, tpm / 60000 * tonumber(ARGV[10]))
    t = math.min(cap_t, (tonumber(b[2]) or 0) + elapsed * tpm / 60000)
    if t < cost then
      redis.call('HSET', KEYS[2], 'r', r, 't', t, 'ts', now)
      return math.ceil((cost - t) * 60000 / tpm)
    end
  end
  redis.call('HSET', KEYS[2], 'r', r - 1, 't', t - cost, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end

if maxc > 0 then
  redis.call('ZADD', KEYS[1], now + lease_ms, holder)
  redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
  return -1
end
if rpm > 0 or tpm > 0 then redis.call('SET', KEYS[4], '1', 'PX', ARGV[12]) end
return 0
""")

# KEYS: in-flight leases. ARGV: now (ms), new expiry (ms), holders. Extends the leases still
# running; an expired one stays expired (the next acquire prunes it). Returns how many were kept.
_RENEW = Script("""
local kept = 0
for i = 3, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry and tonumber(expiry) > tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i])
    kept = kept + 1
  end
end
return kept
""")

_PAUSE = Script("""
local pause_end = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause_end > current then
  redis.call('SET', KEYS[1], pause_end, 'PX', pause_end - tonumber(ARGV[2]) + tonumber(ARGV[3]))
  return 1
end
return 0
""")


async def acquire(
    r: Redis, provider: Provider, holder: str, cost: int, *, lease_ms: int, op_id: str, now_ms: int | None = None,
) -> int:
    """One attempt at admitting ``holder`` to ``provider``: ms to wait, or 0 (go) / -1 (go, holding a lease).

    ``op_id`` names the attempt: running it again (redis-py re-sending it after a lost reply)
    takes no second rate token or concurrency slot and answers the same.
    """
    rpm = (provider.rpm or 0) * SAFETY
    tpm = (provider.tpm or 0) * SAFETY
    if tpm and cost > tpm:
        cost = int(tpm)  # a request larger than a minute's budget still goes, alone
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return int(await _ACQUIRE(
        r,
        [keys.provider_inflight(provider.name), keys.provider_bucket(provider.name), keys.provider_pause(provider.name),
         keys.provider_op(provider.name, op_id)],
        [now_ms, lease_ms, holder, provider.max_concurrency or 0, rpm, tpm, cost,
         int(RAMP_S * 1000), RAMP_DEFAULT_CONCURRENCY, int(BURST_S * 1000), RAMP_START, OP_TTL_MS],
    ))


class Limiter:
    """Admission of requests to providers, shared through Redis by every worker."""

    def __init__(self, redis: Redis, lease_s: float) -> None:
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)
        self.locks: dict[str, asyncio.Lock] = {}
        self.pause_seen: dict[str, tuple[float, bool]] = {}  # provider -> (when looked up, pause key there)

    @asynccontextmanager
    async def slot(self, provider: Provider, holder: str, cost: int) -> AsyncIterator[None]:
        """Wait until ``provider`` may take one more request, hold the slot while it runs."""
        if not provider.limited and not await self._pause_on(provider):
            # Nothing to count: only a pause after a 429 (or its ramp) could hold the request back,
            # and that needs no Redis round trip per request to notice.
            yield
            return
        async with self.locks.setdefault(provider.name, asyncio.Lock()):
            while (answer := await self._try(provider, holder, cost)) > 0:  # noqa: ASYNC110 - the slots are in Redis
                await asyncio.sleep(min(answer / 1000, MAX_POLL_S) + random.uniform(0, 0.005))
        try:
            yield
        finally:
            if answer < 0:
                # Best effort: an unreleased lease expires by itself; the answer matters more.
                with contextlib.suppress(*REDIS_DOWN):
                    await self.redis.zrem(keys.provider_inflight(provider.name), holder)

    async def _pause_on(self, provider: Provider) -> bool:
        """Whether a pause or the ramp after it is on, looked up at most every ``PAUSE_CHECK_S``."""
        now = time.monotonic()
        checked, on = self.pause_seen.get(provider.name, (float("-inf"), False))
        if now - checked >= PAUSE_CHECK_S:
            self.pause_seen[provider.name] = (now, on)  # concurrent callers use the last answer meanwhile
            on = bool(await self.redis.exists(keys.provider_pause(provider.name)))
            self.pause_seen[provider.name] = (now, on)
        return on

    async def _try(self, provider: Provider, holder: str, cost: int) -> int:
        return await acquire(self.redis, provider, holder, cost, lease_ms=self.lease_ms, op_id=secrets.token_hex(8))

    async def renew(self, provider_name: str, holders: list[str]) -> int:
        """Extend the concurrency leases of requests still running; return how many were still held."""
        now = int(time.time() * 1000)
        return int(await _RENEW(self.redis, [keys.provider_inflight(provider_name)], [now, now + self.lease_ms, *holders]))

    async def pause(self, provider: Provider, seconds: float) -> bool:
        """Stop every worker from sending to ``provider`` for ``seconds`` (a 429's Retry-After)."""
        now = int(time.time() * 1000)
        self.pause_seen[provider.name] = (time.monotonic(), True)
        with contextlib.suppress(*REDIS_DOWN):
            return bool(await _PAUSE(
                self.redis, [keys.provider_pause(provider.name)], [now + int(seconds * 1000), now, int(RAMP_S * 1000)],
            ))
        return False
