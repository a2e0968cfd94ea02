"""Provider limits that hold across every worker process, kept in Redis.

One Lua script (``_EXCHANGE``) gives back the leases of requests that ended and decides,
atomically, how many of the requests a worker has waiting for a provider may go now:

- adaptive concurrency (AIMD), on unless a provider turns it off: a *window* per provider
  (``keys.provider_window``) caps the requests in flight at every worker together. It starts at
  ``adaptive_start`` and doubles every round trip until the provider first pushes back (slow
  start). A 429, a 503 or a timeout multiplies it by ``adaptive_decrease``, once per window of
  requests: the signals of requests admitted before the last cut are the same burst and cut
  nothing more. After a later cut it climbs back quickly to 2 below the size that was too much,
  then grows by one request per window's worth of answers, and by a quarter of that within one
  of that size, where the provider pushed back last: so it spends its time just under the limit.
  Only a window that is full grows. It never goes below 1 (progress never stops) nor above
  ``max_concurrency``, or, when none is set, the live workers' slots (their heartbeats carry
  their concurrency). So a provider whose limit nobody published is found, and followed when it
  moves;
- a pause after a 429 that says ``Retry-After`` stops every worker; once it ends, the cap
  ramps up again over ``RAMP_S`` instead of jumping back to full;
- ``max_concurrency`` and the window count leases in a sorted set scored by their expiry, so
  the share of a worker that died is released by expiry instead of leaking (live workers renew
  their leases, and a renewal never brings back a lease that has expired: a worker resuming from
  a pause must not take back a slot another worker may already be using);
- ``rpm`` and ``tpm``: token buckets refilled continuously, started empty and kept small so
  bursts stay well inside the provider's window; they run at ``SAFETY`` of the configured rate.

The script is safe to run twice (redis-py re-sends a command whose reply was lost): a lease is
given back (and its outcome counted) only if it was really still there, a holder that already
has a lease goes on with it, and an admission without a lease is recorded under the call's op key.

Inside one process, the requests waiting for a provider queue in arrival order and the leases to
give back queue beside them; one task sends both in one call per round. A lease given back wakes
it at once when a request of this process waits (its slot is free); otherwise it waits up to
``RELEASE_LINGER_S`` for the next request, so that under load a line's release and the next line's
admission share a call, and a request costs a share of one round trip. A
provider with no limit and adaptive concurrency off skips all of this unless a pause is on: a
worker looks for one at most every ``PAUSE_CHECK_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import structlog

from service.core import keys
from service.core.config import RAMP_S, Provider
from service.core.connections import REDIS_DOWN, Script
from service.core.heartbeat import BEAT_S, worker_slots
from service.core.store import Redis

log = structlog.get_logger("sluice.limits")

RAMP_START = 0.1  # fraction of the concurrency cap allowed right after a pause
SAFETY = 0.95
BURST_S = 0.25
MAX_POLL_S = 1.0
# How long a worker waits before asking again when the cap is full and no release of its own wakes it.
FULL_POLL_MS = 25
# How stale a worker's view of a provider's pause may be (the ramp and every limit stay exact).
PAUSE_CHECK_S = 0.25
# Concurrency cap during the ramp of a provider configured without one (and adaptive concurrency off).
RAMP_DEFAULT_CONCURRENCY = 64
# How long an admission without a lease is remembered for a re-run (redis-py's retries of one call).
OP_TTL_MS = 5 * 60 * 1000
# A provider's window is forgotten after this long without a request: it starts over (slow start).
WINDOW_TTL_MS = 10 * 60 * 1000
# Requests admitted in one call at most.
MAX_ADMIT = 256
# How long leases given back wait for a request of this process to ride with, when none of its
# requests waits for the slots they free: under load the next request comes within a few ms, and
# one call then does both. Bounded, since other workers' requests may be waiting for those slots.
RELEASE_LINGER_S = 0.005

# What a request's answer tells the window (Ticket.outcome).
OK = "ok"  # the provider answered (any status but 429/503): it had room
CONGESTED = "congested"  # 429, 503 or a timeout: it had none
NO_SIGNAL = "none"  # no answer to learn from (a connection error, a cancelled call)

# One call per round: give back the leases of requests that ended (moving the window with what
# their provider answered), then admit as many waiting requests as the limits allow now.
# op is this call's op key; cap is max_concurrency (0: none); ramp_cap the ramp's default cap;
# adaptive 1/0; full_poll_ms the poll when full. exchanges holds ``released`` (holder, outcome,
# admitted at ms) given back, then (holder, cost) per request waiting, in order: their ARGV slots
# start at 18.
# Returns {admitted (the first of those waiting), ms to wait for the rest, 1 if they hold leases,
#          the window after the call ('' when adaptive concurrency is off)}.
_EXCHANGE = Script(
    keys=("inflight", "bucket", "pause", "op", "window"),
    args=(
        "now",
        "lease_ms",
        "cap",
        "rpm",
        "tpm",
        "ramp_ms",
        "ramp_cap",
        "burst_ms",
        "ramp_start",
        "op_ttl_ms",
        "adaptive",
        "ceiling",
        "window_start",
        "decrease",
        "window_ttl_ms",
        "full_poll_ms",
        "released",
        "*exchanges",
    ),
    source="""
local now = tonumber(ARGV.now)
local lease_ms = tonumber(ARGV.lease_ms)
local cap = tonumber(ARGV.cap)
local rpm = tonumber(ARGV.rpm)
local tpm = tonumber(ARGV.tpm)
local ramp_ms = tonumber(ARGV.ramp_ms)
local burst = tonumber(ARGV.burst_ms)
local adaptive = ARGV.adaptive == '1'
local ceiling = tonumber(ARGV.ceiling)
local released = tonumber(ARGV.released)
local base = 17 + 3 * released
local n = (#ARGV - base) / 2
local function holder(i) return ARGV[base + 2 * i - 1] end
local function cost(i) return tonumber(ARGV[base + 2 * i]) end

local w
local window = ''
if adaptive then
  local h = redis.call('HMGET', KEYS.window, 'w', 'ss', 'wmax', 'cut')
  w = tonumber(h[1]) or tonumber(ARGV.window_start)
  local ss = tonumber(h[2])
  local wmax = tonumber(h[3]) or 0
  local cut = tonumber(h[4]) or 0
  if released > 0 then
    local inflight = redis.call('ZCARD', KEYS.inflight)
    -- Grow only a window that held requests back: one that is not used says nothing of the provider.
    -- While it doubles, half full will do: refilling the slots freed in one call takes a round trip.
    local used = math.min(math.floor(w), ceiling)
    if not ss or w < ss then used = used / 2 end
    local full = inflight >= used
    for i = 18, base, 3 do
      -- Only a lease really removed counts, so a re-sent call moves the window once.
      if redis.call('ZREM', KEYS.inflight, ARGV[i]) == 1 then
        local outcome = ARGV[i + 1]
        if outcome == 'ok' and full then
          if not ss or w < ss then
            w = w + 1
          elseif math.abs(w - wmax) < 1 then
            w = w + 0.25 / w
          else
            w = w + 1 / w
          end
        elseif outcome == 'congested' and tonumber(ARGV[i + 2]) > cut then
          -- The first signal of a window cuts it; requests admitted before that cut are the same burst.
          local starting = not ss or w < ss
          wmax = math.min(w, inflight)
          w = math.max(1, wmax * tonumber(ARGV.decrease))
          if starting then
            -- Doubling overshoots by up to twice the limit: nothing below that size is known to hold.
            ss = w
          else
            -- Back to just below the size that held quickly (doubling), then probe slowly around it.
            ss = math.max(w, wmax - 2)
          end
          cut = now
        end
        inflight = inflight - 1
      end
    end
    w = math.max(1, math.min(w, ceiling))
    redis.call('HSET', KEYS.window, 'w', tostring(w), 'wmax', tostring(wmax), 'cut', cut)
    if ss then redis.call('HSET', KEYS.window, 'ss', tostring(ss)) end
    redis.call('PEXPIRE', KEYS.window, ARGV.window_ttl_ms)
  end
  w = math.max(1, math.min(w, ceiling))
  window = tostring(w)
  if cap == 0 or math.floor(w) < cap then cap = math.floor(w) end
else
  for i = 18, base, 3 do redis.call('ZREM', KEYS.inflight, ARGV[i]) end
end
if n == 0 then return {0, 0, 0, window} end

local paused_until = tonumber(redis.call('GET', KEYS.pause) or '0')
if paused_until > 0 and paused_until <= now and now - paused_until < ramp_ms then
  local c = cap
  if c == 0 then c = tonumber(ARGV.ramp_cap) end
  local start = tonumber(ARGV.ramp_start)
  cap = math.max(1, math.floor(c * (start + (1 - start) * (now - paused_until) / ramp_ms)))
end
local leased = 0
if cap > 0 then leased = 1 end

-- A re-run after a lost reply: holders that already have a lease go on with it, and an
-- admission without leases answers what it answered.
local granted = 0
while granted < n do
  local held = redis.call('ZSCORE', KEYS.inflight, holder(granted + 1))
  if not held or tonumber(held) <= now then break end
  granted = granted + 1
end
if granted == n then return {n, 0, 1, window} end
local prior = redis.call('GET', KEYS.op)
if prior then return {tonumber(prior), 0, 0, window} end
if paused_until > now then return {granted, paused_until - now, leased, window} end

local count = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS.inflight, '-inf', now)
  count = redis.call('ZCARD', KEYS.inflight)
end
local bucketed = rpm > 0 or tpm > 0
local r, t = 0, 0
if bucketed then
  local b = redis.call('HMGET', KEYS.bucket, 'r', 't', 'ts')
  local elapsed = math.max(0, now - (tonumber(b[3]) or now))
  if rpm > 0 then
    r = math.min(math.max(1, rpm / 60000 * burst), (tonumber(b[1]) or 0) + elapsed * rpm / 60000)
  end
  if tpm > 0 then
    local biggest = 0
    for i = granted + 1, n do biggest = math.max(biggest, cost(i)) end
    t = math.min(math.max(biggest, tpm / 60000 * burst), (tonumber(b[2]) or 0) + elapsed * tpm / 60000)
  end
end
local first = granted
local wait = 0
while granted < n do
  local c = cost(granted + 1)
  if cap > 0 and count >= cap then wait = tonumber(ARGV.full_poll_ms) break end
  if rpm > 0 and r < 1 then wait = math.ceil((1 - r) * 60000 / rpm) break end
  if tpm > 0 and t < c then wait = math.ceil((c - t) * 60000 / tpm) break end
  if rpm > 0 then r = r - 1 end
  if tpm > 0 then t = t - c end
  if cap > 0 then
    redis.call('ZADD', KEYS.inflight, now + lease_ms, holder(granted + 1))
    count = count + 1
  end
  granted = granted + 1
end
if bucketed then
  redis.call('HSET', KEYS.bucket, 'r', r, 't', t, 'ts', now)
  redis.call('PEXPIRE', KEYS.bucket, 120000)
end
if granted > first then
  if cap > 0 then
    redis.call('PEXPIRE', KEYS.inflight, lease_ms * 2)
  elseif bucketed then
    redis.call('SET', KEYS.op, granted, 'PX', ARGV.op_ttl_ms)
  end
end
return {granted, wait, leased, window}
""",
)

# Extends the leases of holders still running (expiry: their new one, ms); an expired one stays expired (the next acquire prunes it). Returns how many were kept.
_RENEW = Script(
    keys=("inflight",),
    args=("now", "expiry", "*holders"),
    source="""
local kept = 0
for i = 3, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS.inflight, ARGV[i])
  if expiry and tonumber(expiry) > tonumber(ARGV.now) then
    redis.call('ZADD', KEYS.inflight, 'XX', ARGV.expiry, ARGV[i])
    kept = kept + 1
  end
end
return kept
""",
)

_PAUSE = Script(
    keys=("pause",),
    args=("pause_end", "now", "ramp_ms"),
    source="""
local pause_end = tonumber(ARGV.pause_end)
local current = tonumber(redis.call('GET', KEYS.pause) or '0')
if pause_end > current then
  redis.call('SET', KEYS.pause, pause_end, 'PX', pause_end - tonumber(ARGV.now) + tonumber(ARGV.ramp_ms))
  return 1
end
return 0
""",
)


@dataclass(frozen=True)
class Admission:
    """What one ``_EXCHANGE`` call answered."""

    admitted: int  # the first ``admitted`` holders may go
    wait_ms: int  # when to ask again for the others
    leased: bool  # the admitted hold concurrency leases (to renew and release)
    window: float | None  # the provider's adaptive window (None: off)


def _ceiling(provider: Provider, slots: int) -> int:
    return provider.max_concurrency or slots or RAMP_DEFAULT_CONCURRENCY


async def exchange(
    r: Redis,
    provider: Provider,
    *,
    releases: Sequence[tuple[str, str, int]] = (),
    holders: Sequence[tuple[str, int]] = (),
    lease_ms: int,
    op_id: str,
    slots: int = 0,
    now_ms: int | None = None,
) -> Admission:
    """Give back ``releases`` (``(holder, outcome, admitted at ms)``; the outcome, ``OK``, ``CONGESTED`` or
    ``NO_SIGNAL``, moves the adaptive window), then admit as many of ``holders`` (``(holder, cost)``, in
    order) to ``provider`` as its limits allow now, in one step.

    ``op_id`` names the call: running it again (redis-py re-sending it after a lost reply) gives
    nothing back twice, takes no second rate token or concurrency slot and admits the same holders.
    ``slots`` is the live workers' concurrency, the window's ceiling when the provider sets no
    ``max_concurrency``.
    """
    rpm = (provider.rpm or 0) * SAFETY
    tpm = (provider.tpm or 0) * SAFETY
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    exchanges: list[str | int | float] = []
    for lease in releases:
        exchanges += list(lease)
    for holder, cost in holders:
        # A request larger than a minute's budget still goes, alone.
        exchanges += [holder, min(cost, int(tpm)) if tpm else cost]
    admitted, wait, leased, window = await _EXCHANGE(
        r,
        inflight=keys.provider_inflight(provider.name),
        bucket=keys.provider_bucket(provider.name),
        pause=keys.provider_pause(provider.name),
        op=keys.provider_op(provider.name, op_id),
        window=keys.provider_window(provider.name),
        now=now_ms,
        lease_ms=lease_ms,
        cap=provider.max_concurrency or 0,
        rpm=rpm,
        tpm=tpm,
        ramp_ms=int(RAMP_S * 1000),
        ramp_cap=RAMP_DEFAULT_CONCURRENCY,
        burst_ms=int(BURST_S * 1000),
        ramp_start=RAMP_START,
        op_ttl_ms=OP_TTL_MS,
        adaptive=1 if provider.is_adaptive else 0,
        ceiling=_ceiling(provider, slots),
        window_start=provider.adaptive_start,
        decrease=provider.adaptive_decrease,
        window_ttl_ms=WINDOW_TTL_MS,
        full_poll_ms=FULL_POLL_MS,
        released=len(releases),
        exchanges=exchanges,
    )
    window = window.decode() if isinstance(window, bytes) else window
    return Admission(int(admitted), int(wait), bool(int(leased)), float(window) if window else None)


async def admit(
    r: Redis,
    provider: Provider,
    holders: list[tuple[str, int]],
    *,
    lease_ms: int,
    op_id: str,
    slots: int = 0,
    now_ms: int | None = None,
) -> Admission:
    """Admit as many of ``holders`` as ``provider``'s limits allow now (``exchange`` giving nothing back)."""
    return await exchange(r, provider, holders=holders, lease_ms=lease_ms, op_id=op_id, slots=slots, now_ms=now_ms)


async def acquire(
    r: Redis,
    provider: Provider,
    holder: str,
    cost: int,
    *,
    lease_ms: int,
    op_id: str,
    now_ms: int | None = None,
    slots: int = 0,
) -> int:
    """One attempt at admitting ``holder`` to ``provider``: ms to wait, or 0 (go) / -1 (go, holding a lease)."""
    answer = await admit(r, provider, [(holder, cost)], lease_ms=lease_ms, op_id=op_id, slots=slots, now_ms=now_ms)
    if answer.admitted:
        return -1 if answer.leased else 0
    return max(1, answer.wait_ms)


async def release(
    r: Redis,
    provider: Provider,
    leases: list[tuple[str, str, int]],
    *,
    slots: int = 0,
    now_ms: int | None = None,
) -> float | None:
    """Give back ``leases`` (``exchange`` admitting nothing); the window after (None: not adaptive)."""
    answer = await exchange(r, provider, releases=leases, lease_ms=0, op_id="release", slots=slots, now_ms=now_ms)
    return answer.window


@dataclass
class Ticket:
    """One request's passage through the limiter; ``outcome`` tells the window what the provider answered.

    ``holder`` names its lease: the line's name and the attempt, so that the next attempt of a line
    never meets the lease of the last one, whose release may still be on its way.
    """

    holder: str
    cost: int
    leased: bool = False
    admitted_ms: int = 0
    outcome: str = NO_SIGNAL


class _Queue:
    """One process's traffic to one provider: requests waiting for a slot (admitted in arrival order)
    and leases to give back; one task sends both, together, a call per round."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[Ticket, asyncio.Future[None]]] = deque()
        self.releasing: list[Ticket] = []  # nobody waits for a release: no future per lease
        self.released = asyncio.Event()  # a lease of this process is to be given back: a slot is free
        self.arrived = asyncio.Event()  # a request of this process started waiting
        self.task: asyncio.Task[None] | None = None


class Limiter:
    """Admission of requests to providers, shared through Redis by every worker."""

    def __init__(self, redis: Redis, lease_s: float, own_slots: int = 0) -> None:
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)
        self.own_slots = own_slots
        self.queues: dict[str, _Queue] = {}
        self.pause_seen: dict[str, tuple[float, bool]] = {}  # provider -> (when looked up, pause key there)
        self.slots_seen: tuple[float, int] = (float("-inf"), 0)
        self.windows: dict[str, float] = {}  # provider -> its window, as last seen
        self.leases: dict[str, str] = {}  # line holder -> the lease its request in flight holds
        self.attempts = itertools.count(1)

    @asynccontextmanager
    async def slot(self, provider: Provider, holder: str, cost: int) -> AsyncIterator[Ticket]:
        """Wait until ``provider`` may take one more request, hold the slot while it runs.

        Set the yielded ticket's ``outcome`` before leaving: it moves the adaptive window.
        """
        ticket = Ticket(f"{holder}#{next(self.attempts)}", cost)
        if not provider.limited and not await self._pause_on(provider):
            # Nothing to count: only a pause after a 429 (or its ramp) could hold the request back,
            # and that needs no Redis round trip per request to notice.
            yield ticket
            return
        await self._admit(provider, ticket)
        if ticket.leased:
            self.leases[holder] = ticket.holder
        try:
            yield ticket
        finally:
            if ticket.leased:
                self.leases.pop(holder, None)
                # Sent with the next call, not waited for: the line's result matters more, and an
                # unreleased lease expires by itself.
                self._give_back(provider, ticket)

    def _queue(self, provider: Provider) -> _Queue:
        queue = self.queues.get(provider.name)
        if queue is None:
            queue = self.queues[provider.name] = _Queue()
        if queue.task is None or queue.task.done():
            queue.task = asyncio.create_task(self._pump(provider, queue), name=f"limiter-{provider.name}")
        return queue

    async def _admit(self, provider: Provider, ticket: Ticket) -> None:
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queue(provider)
        queue.waiting.append((ticket, admitted))
        queue.arrived.set()
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled() and ticket.leased:
                # Admitted in the same instant it was cancelled: the slot goes back.
                self._give_back(provider, ticket)
            raise

    def _give_back(self, provider: Provider, ticket: Ticket) -> None:
        """Queue the ticket's lease to go back with the next call (nobody waits for it)."""
        queue = self._queue(provider)
        queue.releasing.append(ticket)
        queue.released.set()

    async def _pump(self, provider: Provider, queue: _Queue) -> None:
        """Give back leases and admit waiting requests, a call per round, until there is neither."""
        lingered = False
        while True:
            # Requests that gave up (cancelled at shutdown) leave the queue here, never while a call is out.
            queue.waiting = deque(w for w in queue.waiting if not w[1].done())
            if queue.releasing and not queue.waiting and not lingered:
                queue.arrived.clear()
                # asyncio.timeout, not wait_for: no task per wait (Python 3.11's wait_for makes one).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELEASE_LINGER_S):
                        await queue.arrived.wait()
                lingered = True
                continue
            lingered = False
            releases, queue.releasing = queue.releasing, []
            if not queue.waiting and not releases:
                return
            batch = [queue.waiting[i] for i in range(min(len(queue.waiting), MAX_ADMIT))]
            queue.released.clear()
            try:
                answer = await exchange(
                    self.redis,
                    provider,
                    releases=[(t.holder, t.outcome, t.admitted_ms) for t in releases],
                    holders=[(t.holder, t.cost) for t, _ in batch],
                    lease_ms=self.lease_ms,
                    op_id=secrets.token_hex(8),
                    slots=await self._slots(),
                )
            except Exception as e:
                # Every request in the call sees it (REDIS_DOWN: requests wait for Redis and come back);
                # a lease not given back expires by itself.
                if releases and not isinstance(e, REDIS_DOWN):
                    log.error("lease_release_failed", provider=provider.name, leases=len(releases), error=repr(e))
                for _ in batch:
                    _, waiter = queue.waiting.popleft()
                    if not waiter.done():
                        waiter.set_exception(e)
                continue
            if answer.window is not None:
                self.windows[provider.name] = answer.window
            now_ms = int(time.time() * 1000)
            for _ in range(answer.admitted):
                ticket, waiter = queue.waiting.popleft()
                ticket.leased, ticket.admitted_ms = answer.leased, now_ms
                if not waiter.done():
                    waiter.set_result(None)
                elif answer.leased:
                    self._give_back(provider, ticket)
            if answer.admitted < len(batch) and not queue.releasing:
                wait = min(answer.wait_ms / 1000, MAX_POLL_S) + random.uniform(0, 0.005)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await queue.released.wait()

    async def _slots(self) -> int:
        """The live workers' request slots (looked up at most every heartbeat), at least this worker's."""
        now = time.monotonic()
        checked, slots = self.slots_seen
        if now - checked >= BEAT_S:
            self.slots_seen = (now, slots)  # concurrent callers use the last answer meanwhile
            with contextlib.suppress(*REDIS_DOWN):
                slots = await worker_slots(self.redis)
            self.slots_seen = (now, slots)
        return max(slots, self.own_slots)

    async def _pause_on(self, provider: Provider) -> bool:
        """Whether a pause or the ramp after it is on, looked up at most every ``PAUSE_CHECK_S``."""
        now = time.monotonic()
        checked, on = self.pause_seen.get(provider.name, (float("-inf"), False))
        if now - checked >= PAUSE_CHECK_S:
            self.pause_seen[provider.name] = (now, on)  # concurrent callers use the last answer meanwhile
            on = bool(await self.redis.exists(keys.provider_pause(provider.name)))
            self.pause_seen[provider.name] = (now, on)
        return on

    async def renew(self, provider_name: str, holders: list[str]) -> int:
        """Extend the concurrency leases of the requests of these lines still running; return how many
        were still held (an expired lease is never brought back: a peer may be using its slot)."""
        leases = [self.leases[h] for h in holders if h in self.leases]
        if not leases:
            return 0
        now = int(time.time() * 1000)
        return int(
            await _RENEW(
                self.redis,
                inflight=keys.provider_inflight(provider_name),
                now=now,
                expiry=now + self.lease_ms,
                holders=leases,
            )
        )

    async def pause(self, provider: Provider, seconds: float) -> bool:
        """Stop every worker from sending to ``provider`` for ``seconds`` (a 429's Retry-After)."""
        now = int(time.time() * 1000)
        self.pause_seen[provider.name] = (time.monotonic(), True)
        with contextlib.suppress(*REDIS_DOWN):
            return bool(
                await _PAUSE(
                    self.redis,
                    pause=keys.provider_pause(provider.name),
                    pause_end=now + int(seconds * 1000),
                    now=now,
                    ramp_ms=int(RAMP_S * 1000),
                )
            )
        return False

    async def aclose(self) -> None:
        """Stop admitting (at shutdown): leases still queued go back first, within a few seconds."""
        tasks = [q.task for q in self.queues.values() if q.task is not None and not q.task.done()]
        for queue in self.queues.values():
            for _, waiter in queue.waiting:
                waiter.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
