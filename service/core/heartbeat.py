"""Heartbeats of every Sluice process: web, worker and finalizer.

Every process runs a :class:`Heartbeat`: every ``BEAT_S`` it writes, in one script call, the
process's hash (``keys.process(name)``: role, host, pid, started_at, state, in-flight counts,
...) and its score in ``keys.PROCESSES`` (the Redis time of the beat). The cluster counters are
not carried by beats: the script that records each result moves them exactly once, in its
batch's shard (service/core/counters.py). A process's :class:`Tally` holds only gauges (requests
at each provider now), published with each beat.

A process that stops beating for ``STALE_AFTER_S`` is *stale* (dead, hung or cut off from
Redis); it stays listed for ``PRUNE_AFTER_S`` and is then forgotten. A process that stops
cleanly removes itself.

Beats carry Redis's clock (``TIME`` inside the script), so hosts with skewed clocks still agree
on ages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

from . import keys
from .connections import REDIS_DOWN, Script
from .store import Redis

log = structlog.get_logger("sluice.heartbeat")

BEAT_S = 2.0
STALE_AFTER_S = 3 * BEAT_S
PRUNE_AFTER_S = 600
ROLES = ("web", "worker", "finalizer")

# fields are the process's (name, value) pairs.
_BEAT = Script(
    keys=("processes", "process"),
    args=("name", "prune_s", "*fields"),
    source="""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS.process, 'seen_at', string.format('%.3f', now), unpack(ARGV, 3))
redis.call('EXPIRE', KEYS.process, ARGV.prune_s)
redis.call('ZADD', KEYS.processes, now, ARGV.name)
redis.call('ZREMRANGEBYSCORE', KEYS.processes, '-inf', now - tonumber(ARGV.prune_s))
redis.call('EXPIRE', KEYS.processes, ARGV.prune_s)
return 1
""",
)


class Tally:
    """One process's gauges, in memory: what its heartbeat publishes besides its own fields."""

    def __init__(self) -> None:
        self.requests_in_flight: dict[str, int] = {}  # provider -> requests at it now

    def started(self, provider: str) -> None:
        """A request to ``provider`` was sent."""
        self.requests_in_flight[provider] = self.requests_in_flight.get(provider, 0) + 1

    def ended(self, provider: str) -> None:
        """A request to ``provider`` was answered (or failed)."""
        self.requests_in_flight[provider] -= 1


class Heartbeat:
    """Publishes one process's heartbeat every ``BEAT_S``; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        name: str,
        role: str,
        *,
        tally: Tally | None = None,
        fields: Callable[[], Mapping[str, str | int | float]] | None = None,
        interval: float = BEAT_S,
    ) -> None:
        self.redis = redis
        self.name = name
        self.role = role
        self.tally = tally if tally is not None else Tally()
        self.fields = fields
        self.interval = interval
        self.static: dict[str, str | int | float] = {
            "role": role,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": f"{time.time():.3f}",
        }
        self.task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.failing = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        while not self.stopping.is_set():
            await self.beat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.interval)

    async def beat(self) -> bool:
        """Publish now; False when Redis does not answer."""
        fields = {
            **self.static,
            **(self.fields() if self.fields else {}),
            **{f"requests:{p}": n for p, n in self.tally.requests_in_flight.items()},
        }
        try:
            await _BEAT(
                self.redis,
                processes=keys.PROCESSES,
                process=keys.process(self.name),
                name=self.name,
                prune_s=PRUNE_AFTER_S,
                fields=fields,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # REDIS_DOWN mostly; never let the heartbeat task die
            if not self.failing:
                log.warning("heartbeat_failed", process=self.name, error=f"{type(e).__name__}: {e}")
                self.failing = True
            return False
        self.failing = False
        return True

    async def close(self) -> None:
        """Stop beating and leave the list of processes (a clean stop)."""
        if self.task is not None:
            # Let a beat under way finish, so the removal below comes after it.
            self.stopping.set()
            done, _ = await asyncio.wait({self.task}, timeout=5.0)
            if not done:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
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
