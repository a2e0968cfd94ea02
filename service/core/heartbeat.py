"""Heartbeats and cluster-wide counters of the worker and finalizer processes.

Every worker and the finalizer run a :class:`Heartbeat`: every ``BEAT_S`` it writes, in one
script call, the process's hash (``keys.process(name)``: role, host, pid, started_at, in-flight
counts, ...), its score in ``keys.PROCESSES`` (the Redis time of the beat) and whatever its
:class:`Tally` counted since the last beat, folded into the cluster-wide counter hashes with
HINCRBY. Counting a line or a request is a dict increment in process memory; nothing costs a
Redis round trip per line.

A process that stops beating for ``STALE_AFTER_S`` is *stale* (dead, hung or cut off from
Redis); it stays listed for ``PRUNE_AFTER_S`` and is then forgotten. A process that stops
cleanly flushes its counters and removes itself.

Beats carry Redis's clock (``TIME`` inside the script), so hosts with skewed clocks still agree
on ages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping

import structlog

from . import keys
from .connections import REDIS_DOWN, Script
from .store import Redis

log = structlog.get_logger("sluice.heartbeat")

BEAT_S = 2.0
STALE_AFTER_S = 3 * BEAT_S
PRUNE_AFTER_S = 600
# Upper bounds (seconds) of the upstream latency histogram; +Inf is implied.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LE = tuple(f"{b:g}" for b in LATENCY_BUCKETS)

# Every key here expires unless beats keep it: the counters live as long as any process beats
# at least once in this period (a reset after that is an ordinary counter reset to Prometheus).
COUNTERS_TTL_S = 30 * 24 * 3600

# KEYS: processes zset, process hash, lines, upstream, latency counter hashes.
# ARGV: name, prune_s, counters_ttl_s, beat number, 2 * number of process fields, the fields, then
# (key index, field, amount) triples: HINCRBYFLOAT when the amount has a dot or an exponent, HINCRBY
# otherwise. The counters of a beat number already applied (the process hash keeps the last one)
# are not added again: redis-py re-sends a beat whose reply was lost, and a process re-sends a beat
# it could not confirm.
_BEAT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seq = tonumber(ARGV[4])
local applied = tonumber(redis.call('HGET', KEYS[2], 'beat_seq') or '0')
local n = tonumber(ARGV[5])
redis.call('HSET', KEYS[2], 'seen_at', string.format('%.3f', now), 'beat_seq', math.max(seq, applied),
           unpack(ARGV, 6, 5 + n))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if seq > applied then
  for i = 6 + n, #ARGV, 3 do
    local amount = ARGV[i + 2]
    if string.find(amount, '[.eE]') then
      redis.call('HINCRBYFLOAT', KEYS[tonumber(ARGV[i])], ARGV[i + 1], amount)
    else
      redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], amount)
    end
  end
end
for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
""")

_LINES, _UPSTREAM, _LATENCY = 3, 4, 5


class _Hist:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.sum = 0.0
        self.count = 0


class Tally:
    """What one process counted since its last beat, plus its gauges; all in memory."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.latency: dict[tuple[str, str], _Hist] = {}
        self.upstream: dict[str, int] = {}  # "retries|p", "rate_limited|p", "pauses|p"
        self.requests_in_flight: dict[str, int] = {}  # provider -> requests at it now (a gauge)

    # ---- per line / per request: dict increments only
    def line(self, outcome: str, n: int = 1) -> None:
        """``n`` lines recorded with ``outcome`` (``completed`` or ``failed``)."""
        if n:
            self.lines[outcome] = self.lines.get(outcome, 0) + n

    def request(self, provider: str, status: str, seconds: float) -> None:
        """One upstream request answered with ``status`` (or "timeout", "connection_error")."""
        h = self.latency.get((provider, status))
        if h is None:
            h = self.latency[(provider, status)] = _Hist()
        i = bisect_left(LATENCY_BUCKETS, seconds)
        if i < len(LATENCY_BUCKETS):
            h.buckets[i] += 1
        h.sum += seconds
        h.count += 1

    def count(self, what: str, provider: str) -> None:
        """One more ``retries``, ``rate_limited`` (a 429) or ``pauses`` for ``provider``."""
        field = f"{what}|{provider}"
        self.upstream[field] = self.upstream.get(field, 0) + 1

    def started(self, provider: str) -> None:
        self.requests_in_flight[provider] = self.requests_in_flight.get(provider, 0) + 1

    def ended(self, provider: str) -> None:
        self.requests_in_flight[provider] -= 1

    # ---- at each beat
    def take(self) -> list[str | int]:
        """The counters since the last call as (key index, field, amount) triples; resets them."""
        lines, self.lines = self.lines, {}
        latency, self.latency = self.latency, {}
        upstream, self.upstream = self.upstream, {}
        out: list[str | int] = []
        for outcome, n in lines.items():
            out += [_LINES, outcome, n]
        for field, n in upstream.items():
            out += [_UPSTREAM, field, n]
        for (provider, status), h in latency.items():
            prefix = f"{provider}|{status}|"
            for le, n in zip(_LE, h.buckets):
                if n:
                    out += [_LATENCY, prefix + le, n]
            out += [_LATENCY, prefix + "sum", repr(float(h.sum)), _LATENCY, prefix + "count", h.count]
        return out


class Heartbeat:
    """Publishes one process's heartbeat and tally every ``BEAT_S``; see the module docstring."""

    def __init__(
        self, redis: Redis, name: str, role: str, *, tally: Tally | None = None,
        fields: Callable[[], Mapping[str, str | int | float]] | None = None, interval: float = BEAT_S,
    ) -> None:
        self.redis = redis
        self.name = name
        self.role = role
        self.tally = tally if tally is not None else Tally()
        self.fields = fields
        self.interval = interval
        self.static = {"role": role, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": f"{time.time():.3f}"}
        self.task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.failing = False
        self.seq = 0  # beats numbered from 1; the process hash records the last one applied
        self.unconfirmed: tuple[int, list[str | int]] | None = None  # a beat sent without a reply

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        while not self.stopping.is_set():
            await self.beat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.interval)

    async def beat(self) -> bool:
        """Publish now; False (counters kept for the next beat) when Redis does not answer.

        A beat that failed may still have been applied (only its reply was lost): the next beat
        sends the same counters under the same number, which the script applies at most once;
        what was counted meanwhile waits for the beat after.
        """
        flat: list[str | int | float] = []
        for k, v in {**self.static, **(self.fields() if self.fields else {}),
                     **{f"requests:{p}": n for p, n in self.tally.requests_in_flight.items()}}.items():
            flat += [k, v]
        if self.unconfirmed is None:
            self.seq += 1
            self.unconfirmed = (self.seq, self.tally.take())
        seq, taken = self.unconfirmed
        try:
            await _BEAT(self.redis, [keys.PROCESSES, keys.process(self.name), keys.METRICS_LINES,
                                     keys.METRICS_UPSTREAM, keys.METRICS_LATENCY],
                        [self.name, PRUNE_AFTER_S, COUNTERS_TTL_S, seq, len(flat), *flat, *taken])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # REDIS_DOWN mostly; never let the heartbeat task die
            if not self.failing:
                log.warning("heartbeat_failed", process=self.name, error=f"{type(e).__name__}: {e}")
                self.failing = True
            return False
        self.unconfirmed = None
        self.failing = False
        return True

    async def close(self) -> None:
        """Stop beating, flush the last counters and leave the list of processes (a clean stop)."""
        if self.task is not None:
            # Let a beat under way finish (cancelling it could count its counters twice).
            self.stopping.set()
            done, _ = await asyncio.wait({self.task}, timeout=5.0)
            if not done:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        resend = self.unconfirmed is not None
        if await self.beat() and (not resend or await self.beat()):  # a resent beat leaves the new counters
            with contextlib.suppress(*REDIS_DOWN):
                pipe = self.redis.pipeline(transaction=True)
                pipe.zrem(keys.PROCESSES, self.name)
                pipe.delete(keys.process(self.name))
                await pipe.execute()


async def worker_slots(redis: Redis) -> int:
    """Request slots of the live workers (the ``concurrency`` their heartbeats carry); 0 when none beats."""
    pipe = redis.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.PROCESSES, 0, -1, withscores=True)
    (sec, usec), procs = await pipe.execute()
    now = sec + usec / 1e6
    live = [name for name, seen in procs if now - float(seen) <= STALE_AFTER_S]
    if not live:
        return 0
    pipe = redis.pipeline(transaction=False)
    for name in live:
        pipe.hmget(keys.process(name.decode() if isinstance(name, bytes) else name), "role", "concurrency")
    total = 0
    for role, concurrency in await pipe.execute():
        if role == b"worker" and concurrency:
            try:
                total += int(float(concurrency))
            except ValueError:
                continue
    return total
