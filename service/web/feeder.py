"""Feeding running batches into Redis a bounded window at a time, inside every web process.

Redis never holds a whole input file: it holds a *window* of each running batch's request lines
(``Settings.window``: at most ``SLUICE_WINDOW_LINES`` lines and about ``SLUICE_WINDOW_BYTES``).
Each tick, for every batch in a shard's ``keys.feeding_batches`` whose lease this process holds, the
feeder tops the stream up once fewer than half a window of lines is outstanding (published
without a result yet), reading on from the input file in storage.

Resuming is exact: the number of lines published (``feed_index``) and the byte offset of the
next line (``feed_offset``) live in the batch hash and move in the same script that adds the
lines, and that script refuses to run from a stale position or without the feeder lease
(``keys.feeder``, with a fencing token: ``service/core/leases.py``). A process taking over a batch
after a crash or a stall (its lease expired) continues where the last one stopped: no line twice,
none skipped; the stalled one, resumed, publishes nothing more. Stream entry ids stay
``0-<line index + 1>``.

Lines routed to a provider the batch delegates to (its own Batch API, ``deleg_providers``) are
passed over: the finalizers upload them (workers/delegate.py). The window of such a batch counts
the lines in its stream (published and not yet recorded), since its delegated lines finish on
the provider's schedule, not the workers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncGenerator

import structlog

from service.core import keys, leases, shards, store, tracing
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage
from service.core.leases import FencedScript, Lease, LeaseLost
from service.core.loop import run_loop
from service.core.records import BatchField, BatchRecord
from service.core.storage import Storage
from service.core.validation import Line, check_line, iter_lines
from service.core.wire import BatchError

log = structlog.get_logger("sluice.feeder")

TICK_S = 0.05
# The shards' feeding sets (16 SMEMBERS) are read this often, and whenever ``wake`` is set (this
# process started a batch): reading them every tick cost 320 calls/s per web process, busy or idle.
# Batches held are topped up every tick regardless; this only delays taking over a peer's batch.
LOOK_S = 0.5
# Lines per script call: one call holds Redis for a moment only, even with 4 KB lines.
CHUNK = 500
# A batch whose feeding failed (say, its input file is damaged) is left alone this long, so
# its error neither floods the log nor holds up the other batches.
REST_S = 5.0

# offset is the feed_offset after the last line read, next_index the feed_index after it, stride the
# number of arguments per line in lines: (index, custom_id, body, provider, cost) per line published
# (delegated lines are read and passed over), followed for a traced batch by the time a sampled
# line is published ("" for the others). Returns the new feed_index, -1 when the position is stale (a peer fed meanwhile) or -2 when the batch's stream is gone (it ended).
_FEED = FencedScript(
    keys=("batch", "stream"),
    args=("expected_index", "offset", "next_index", "stride", "*lines"),
    source="""
if redis.call('HGET', KEYS.batch, 'feed_index') ~= ARGV.expected_index then return -1 end
if redis.call('EXISTS', KEYS.stream) == 0 then return -2 end
local stride = tonumber(ARGV.stride)
for i = 5, #ARGV, stride do
  local id = '0-' .. (tonumber(ARGV[i]) + 1)
  if stride == 6 and ARGV[i + 5] ~= '' then
    redis.call('XADD', KEYS.stream, id, 'c', ARGV[i + 1], 'b', ARGV[i + 2], 'p', ARGV[i + 3], 't', ARGV[i + 4],
               '"""
    + tracing.QUEUED_FIELD
    + """', ARGV[i + 5])
  else
    redis.call('XADD', KEYS.stream, id, 'c', ARGV[i + 1], 'b', ARGV[i + 2], 'p', ARGV[i + 3], 't', ARGV[i + 4])
  end
end
redis.call('HSET', KEYS.batch, 'feed_index', ARGV.next_index, 'feed_offset', ARGV.offset)
return tonumber(ARGV.next_index)
""",
)

_F = BatchField
_FIELDS = (
    _F.STATUS,
    _F.ABORT,
    _F.TOTAL,
    _F.COMPLETED,
    _F.FAILED,
    _F.FEED_INDEX,
    _F.FEED_OFFSET,
    _F.FEED_WINDOW,
    _F.INPUT_KEY,
    _F.ENDPOINT,
    _F.PROVIDER,
    _F.DELEG_PROVIDERS,
    _F.TRACEPARENT,
    _F.TRACE_RUNNING_NS,
)
# Delegated lines passed over per script call, at most: a long run of them is read in steps.
SKIP_CHUNK = 20 * CHUNK


class _Wake(asyncio.Event):
    """The feeder's wake-up (the publisher sets it on starting a batch): ends the wait between
    ticks, and has the next tick read the feeding sets at once."""

    def __init__(self) -> None:
        super().__init__()
        self.look = True

    def set(self) -> None:
        self.look = True
        super().set()


@dataclass
class _Cursor:
    """An open read of a batch's input file, positioned at byte ``offset`` (the next line)."""

    offset: int
    lines: AsyncGenerator[Line, None]


class Feeder:
    """Keeps the streams of the running batches this process leases topped up to their window."""

    def __init__(self, r: store.Redis, storage: Storage, settings: Settings, name: str) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.name = name
        self.wake = _Wake()
        self.feeding: set[str] = set()
        self.look_at = 0.0  # when (monotonic) to read the feeding sets again
        self.cursors: dict[str, _Cursor] = {}
        self.leases: dict[str, Lease] = {}  # batch id -> the feeder lease held
        self.renew_at: dict[str, float] = {}  # batch id -> when (monotonic) to renew its lease
        self.resting: dict[str, float] = {}  # batch id -> until when (monotonic) not to touch it
        # Short enough that a peer takes over soon after a crash, long enough to ride out a pause.
        self.lease_ms = int(min(10.0, settings.lease_s) * 1000)

    async def run(self, stop: asyncio.Event) -> None:
        """Feed until ``stop`` is set, then give up the leases so a peer takes over at once."""
        try:
            await run_loop(
                self.step, stop=stop, outage=Outage(log), log=log, error_event="feeder_error", wake=self.wake
            )
        finally:
            await self._let_go_all()

    async def step(self) -> float:
        """One pass (:meth:`tick`); how long to wait before the next (``wake`` cuts it short)."""
        await self.tick()
        return TICK_S

    async def tick(self) -> None:
        """One pass: top up every batch this process feeds (or can take over)."""
        now = time.monotonic()
        if self.wake.look or now >= self.look_at:
            self.wake.look = False
            self.feeding = set(await shards.members(self.r, keys.feeding_batches))
            self.look_at = now + LOOK_S
        feeding = self.feeding
        for batch_id in set(self.renew_at) - feeding:
            await self._forget(batch_id)
        self.resting = {b: until for b, until in self.resting.items() if until > now}
        mine = [b for b in sorted(feeding - set(self.resting)) if await self._hold(b)]
        if not mine:
            return
        pipe = self.r.pipeline(transaction=False)
        for batch_id in mine:
            pipe.hmget(keys.batch(batch_id), *_FIELDS)
        for batch_id, values in zip(mine, await pipe.execute()):
            h = BatchRecord.from_values(_FIELDS, values)
            h.id = batch_id
            try:
                await self._top_up(batch_id, h)
            except LeaseLost as e:
                # Paused past the lease: a peer feeds this batch now (from what Redis says).
                log.warning("fenced_write_refused", batch_id=batch_id, error=str(e))
                await self._forget(batch_id)
            except REDIS_DOWN:
                raise
            except Exception:
                log.exception("feed_failed", batch_id=batch_id)
                self.resting[batch_id] = time.monotonic() + REST_S
                await self._let_go(batch_id)

    async def _hold(self, batch_id: str) -> bool:
        now = time.monotonic()
        if now < self.renew_at.get(batch_id, 0.0):
            return True
        lease = self.leases.get(batch_id)
        if lease is not None and not await leases.renew(self.r, lease, self.lease_ms):
            log.warning("lease_lost", batch_id=batch_id, lease=lease.key, token=lease.token)
            await self._forget(batch_id)
            lease = None
        if lease is None:
            lease = await leases.take(self.r, keys.feeder(batch_id), self.name, self.lease_ms)
            if lease is None:
                await self._forget(batch_id)
                return False
            # A new token: whatever this process read for the batch before is stale.
            await self._close(batch_id)
            self.leases[batch_id] = lease
        self.renew_at[batch_id] = now + self.lease_ms / 4000
        return True

    async def _top_up(self, batch_id: str, h: BatchRecord) -> None:
        if h.feed_index is None:
            return  # not started yet, or its record is gone
        index, total = h.feed_index, h.total
        lease = self.leases[batch_id]
        if h.status != "in_progress" or h.abort or index >= total:
            # Fully fed, aborting or ended: the finalizer records whatever was never published.
            await leases.execute(self.r, lease, ("SREM", keys.feeding_batches(keys.shard_of(batch_id)), batch_id))
            self.feeding.discard(batch_id)
            await self._let_go(batch_id)
            return
        window = h.feed_window
        delegated = h.deleg_providers
        if delegated:
            outstanding = int(await self.r.xlen(keys.lines(batch_id)))
        else:
            outstanding = index - h.completed - h.failed
        if outstanding > window // 2:
            return
        cursor = await self._cursor(batch_id, h)
        room = window - outstanding
        # A traced batch's lines carry one more argument: when a sampled line was published.
        traced = tracing.enabled() and bool(h.traceparent)
        try:
            while room > 0 and index < total:
                argv, read, end = await self._next_lines(
                    cursor, h, index, min(room, CHUNK, total - index), delegated, traced
                )
                if not read:
                    raise RuntimeError(f"batch {batch_id}: input ended after {index} of {total} lines")
                got = int(
                    await _FEED(
                        self.r,
                        batch=keys.batch(batch_id),
                        stream=keys.lines(batch_id),
                        expected_index=index,
                        offset=end,
                        next_index=index + read,
                        stride=6 if traced else 5,
                        lines=argv,
                        lease=lease,
                    )
                )
                if got < 0:
                    # A peer fed meanwhile, or the batch ended: start over from what Redis says.
                    await self._close(batch_id)
                    return
                cursor.offset = end
                room -= len(argv) // 5
                index = got
                if traced and index >= total:
                    tracing.feeding_done(h, total)
        except BaseException:
            # The reader may be past lines that were never published: reopen at the recorded offset.
            await self._close(batch_id)
            raise

    async def _next_lines(
        self,
        cursor: _Cursor,
        h: BatchRecord,
        index: int,
        count: int,
        delegated: frozenset[str],
        traced: bool = False,
    ) -> tuple[list, int, int]:
        """Script arguments for up to ``count`` more lines to publish, how many lines were read (those
        passed over included), and the offset just past the last one read.

        ``traced``: the batch is traced; each line then gets one more argument: the time it is
        published when it is sampled, else "".
        """
        argv: list[str | int | bytes] = []
        stride = 6 if traced else 5
        traceparent = h.traceparent
        end = cursor.offset
        read = 0
        async for line in cursor.lines:
            request = check_line(line, h.endpoint)
            if isinstance(request, BatchError):
                raise RuntimeError(f"the validated line at byte {end} no longer validates: {request.message}")
            provider = self.settings.provider_for(request.model, h.provider)
            # A provider dropped from the configuration since validation: the worker records the
            # line as failed (provider_not_configured) instead of the batch stalling here.
            name = provider.name if provider else h.provider or f"(none serves {request.model[:100]})"
            if name not in delegated:
                argv += [index + read, request.custom_id, request.body, name, request.cost]
                if traced:
                    argv.append(time.time_ns() if tracing.sampled(traceparent, index + read) else "")
            read += 1
            end = line.end
            if len(argv) >= stride * count or read >= SKIP_CHUNK:
                break
        return argv, read, end

    async def _cursor(self, batch_id: str, h: BatchRecord) -> _Cursor:
        offset = h.feed_offset
        cursor = self.cursors.get(batch_id)
        if cursor is None or cursor.offset != offset:
            await self._close(batch_id)
            cursor = self.cursors[batch_id] = _Cursor(offset, iter_lines(self.storage, h.input_key, start=offset))
        return cursor

    async def _close(self, batch_id: str) -> None:
        cursor = self.cursors.pop(batch_id, None)
        if cursor is not None:
            await cursor.lines.aclose()

    async def _forget(self, batch_id: str) -> Lease | None:
        """Stop feeding ``batch_id`` here (its lease stays until it expires or is dropped)."""
        self.renew_at.pop(batch_id, None)
        await self._close(batch_id)
        return self.leases.pop(batch_id, None)

    async def _let_go(self, batch_id: str) -> None:
        lease = await self._forget(batch_id)
        if lease is not None:
            await leases.drop(self.r, lease)

    async def _let_go_all(self) -> None:
        for batch_id in list(self.leases):
            with contextlib.suppress(*REDIS_DOWN):
                await self._let_go(batch_id)
        for batch_id in list(self.cursors):
            await self._close(batch_id)
