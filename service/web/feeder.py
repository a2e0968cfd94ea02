"""Feeding running batches into Redis a bounded window at a time, inside every web process.

Redis never holds a whole input file: it holds a *window* of each running batch's request lines
(``Settings.window``: at most ``SLUICE_WINDOW_LINES`` lines and about ``SLUICE_WINDOW_BYTES``).
Each tick, for every batch in ``keys.FEEDING_BATCHES`` whose lease this process holds, the
feeder tops the stream up once fewer than half a window of lines is outstanding (published
without a result yet), reading on from the input file in storage.

Resuming is exact: the number of lines published (``feed_index``) and the byte offset of the
next line (``feed_offset``) live in the batch hash and move in the same script that adds the
lines, and that script refuses to run from a stale position. A process taking over a batch
after a crash (its lease expired) continues where the last one stopped: no line twice, none
skipped. Stream entry ids stay ``0-<line index + 1>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator

import structlog

from service.core import keys, store, tracing
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage, Script
from service.core.lifecycle import sleep_unless_stopped
from service.core.storage import Storage
from service.core.validation import Line, check_line, iter_lines
from service.core.wire import BatchError

log = structlog.get_logger("sluice.feeder")

TICK_S = 0.05
# Lines per script call: one call holds Redis for a moment only, even with 4 KB lines.
CHUNK = 500
# A batch whose feeding failed (say, its input file is damaged) is left alone this long, so
# its error neither floods the log nor holds up the other batches.
REST_S = 5.0

# KEYS: batch hash, lines stream. ARGV: feed_index expected, feed_offset after the last line,
# the number of arguments per line, then (custom_id, body, provider, cost) per line, followed
# for a traced batch by the time it is published for a sampled line ("" for the others).
# Returns the new feed_index, -1 when the position is stale (a peer fed meanwhile) or -2 when
# the batch's stream is gone (it ended).
_FEED = Script("""
if redis.call('HGET', KEYS[1], 'feed_index') ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
local index = tonumber(ARGV[1])
local stride = tonumber(ARGV[3])
for i = 4, #ARGV, stride do
  index = index + 1
  if stride == 5 and ARGV[i + 4] ~= '' then
    redis.call('XADD', KEYS[2], '0-' .. index, 'c', ARGV[i], 'b', ARGV[i + 1], 'p', ARGV[i + 2], 't', ARGV[i + 3],
               '""" + tracing.QUEUED_FIELD + """', ARGV[i + 4])
  else
    redis.call('XADD', KEYS[2], '0-' .. index, 'c', ARGV[i], 'b', ARGV[i + 1], 'p', ARGV[i + 2], 't', ARGV[i + 3])
  end
end
redis.call('HSET', KEYS[1], 'feed_index', index, 'feed_offset', ARGV[2])
return index
""")

_FIELDS = ("status", "abort", "total", "completed", "failed", "feed_index", "feed_offset", "feed_window",
           "input_key", "endpoint", "provider", tracing.TRACEPARENT_FIELD, tracing.RUNNING_FIELD)


@dataclass
class _Cursor:
    """An open read of a batch's input file, positioned at byte ``offset`` (the next line)."""

    offset: int
    lines: AsyncIterator[Line]


class Feeder:
    """Keeps the streams of the running batches this process leases topped up to their window."""

    def __init__(self, r: store.Redis, storage: Storage, settings: Settings, name: str) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.name = name
        self.wake = asyncio.Event()
        self.cursors: dict[str, _Cursor] = {}
        self.renew_at: dict[str, float] = {}  # batch id -> when (monotonic) to renew its lease
        self.resting: dict[str, float] = {}  # batch id -> until when (monotonic) not to touch it
        # Short enough that a peer takes over soon after a crash, long enough to ride out a pause.
        self.lease_ms = int(min(10.0, settings.lease_s) * 1000)

    async def run(self, stop: asyncio.Event) -> None:
        """Feed until ``stop`` is set, then give up the leases so a peer takes over at once."""
        outage = Outage(log)
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                    outage.ok()
                except asyncio.CancelledError:
                    raise
                except REDIS_DOWN as e:
                    await sleep_unless_stopped(stop, outage.failed(e))
                    continue
                except Exception:
                    log.exception("feeder_error")
                    await sleep_unless_stopped(stop, 1.0)
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=TICK_S)
        finally:
            await self._let_go_all()

    async def tick(self) -> None:
        """One pass: top up every batch this process feeds (or can take over)."""
        feeding = {b.decode() for b in await self.r.smembers(keys.FEEDING_BATCHES)}
        for batch_id in set(self.renew_at) - feeding:
            await self._forget(batch_id)
        now = time.monotonic()
        self.resting = {b: until for b, until in self.resting.items() if until > now}
        mine = [b for b in sorted(feeding - set(self.resting)) if await self._hold(b)]
        if not mine:
            return
        pipe = self.r.pipeline(transaction=False)
        for batch_id in mine:
            pipe.hmget(keys.batch(batch_id), *_FIELDS)
        for batch_id, values in zip(mine, await pipe.execute()):
            h = {k: v.decode() for k, v in zip(_FIELDS, values) if v is not None}
            try:
                await self._top_up(batch_id, h)
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
        if await store.hold_lease(self.r, keys.feeder(batch_id), self.name, self.lease_ms):
            self.renew_at[batch_id] = now + self.lease_ms / 4000
            return True
        await self._forget(batch_id)
        return False

    async def _top_up(self, batch_id: str, h: dict[str, str]) -> None:
        if "feed_index" not in h:
            return  # not started yet, or its record is gone
        index, total = int(h["feed_index"]), int(h.get("total") or 0)
        if h.get("status") != "in_progress" or h.get("abort") or index >= total:
            # Fully fed, aborting or ended: the finalizer records whatever was never published.
            await self.r.srem(keys.FEEDING_BATCHES, batch_id)
            await self._let_go(batch_id)
            return
        window = int(h["feed_window"])
        outstanding = index - int(h.get("completed") or 0) - int(h.get("failed") or 0)
        if outstanding > window // 2:
            return
        cursor = await self._cursor(batch_id, h)
        room = min(window - outstanding, total - index)
        # A traced batch's lines carry one more argument: when a sampled line was published.
        traced = tracing.enabled() and bool(h.get(tracing.TRACEPARENT_FIELD))
        try:
            while room > 0:
                argv, end = await self._next_lines(cursor, h, min(room, CHUNK), index if traced else None)
                if not argv:
                    raise RuntimeError(f"batch {batch_id}: input ended after {index} of {total} lines")
                got = int(await _FEED(self.r, [keys.batch(batch_id), keys.lines(batch_id)],
                                      [index, end, 5 if traced else 4, *argv]))
                if got < 0:
                    # A peer fed meanwhile, or the batch ended: start over from what Redis says.
                    await self._close(batch_id)
                    return
                cursor.offset = end
                room -= got - index
                index = got
                if traced and index >= total:
                    tracing.feeding_done({**h, "id": batch_id}, total)
        except BaseException:
            # The reader may be past lines that were never published: reopen at the recorded offset.
            await self._close(batch_id)
            raise

    async def _next_lines(
        self, cursor: _Cursor, h: dict[str, str], count: int, traced_from: int | None = None,
    ) -> tuple[list, int]:
        """Script arguments for up to ``count`` more lines, and the offset just past the last one.

        ``traced_from``: the index of the first line, for a traced batch (each line then gets a
        fifth argument: the time it is published when it is sampled, else "").
        """
        argv: list[str | int | bytes] = []
        stride = 4 if traced_from is None else 5
        traceparent = h.get(tracing.TRACEPARENT_FIELD, "")
        end = cursor.offset
        async for line in cursor.lines:
            request = check_line(line, h["endpoint"])
            if isinstance(request, BatchError):
                raise RuntimeError(f"the validated line at byte {end} no longer validates: {request.message}")
            provider = self.settings.provider_for(request.model, h.get("provider", ""))
            # A provider dropped from the configuration since validation: the worker records the
            # line as failed (provider_not_configured) instead of the batch stalling here.
            name = provider.name if provider else h.get("provider") or f"(none serves {request.model[:100]})"
            argv += [request.custom_id, request.body, name, request.cost]
            if traced_from is not None:
                index = traced_from + len(argv) // 5
                argv.append(time.time_ns() if tracing.sampled(traceparent, index) else "")
            end = line.end
            if len(argv) >= stride * count:
                break
        return argv, end

    async def _cursor(self, batch_id: str, h: dict[str, str]) -> _Cursor:
        offset = int(h.get("feed_offset") or 0)
        cursor = self.cursors.get(batch_id)
        if cursor is None or cursor.offset != offset:
            await self._close(batch_id)
            cursor = self.cursors[batch_id] = _Cursor(offset, iter_lines(self.storage, h["input_key"], start=offset))
        return cursor

    async def _close(self, batch_id: str) -> None:
        cursor = self.cursors.pop(batch_id, None)
        if cursor is not None:
            await cursor.lines.aclose()

    async def _forget(self, batch_id: str) -> None:
        """Stop feeding ``batch_id`` here (its lease stays until it expires or is dropped)."""
        self.renew_at.pop(batch_id, None)
        await self._close(batch_id)

    async def _let_go(self, batch_id: str) -> None:
        await self._forget(batch_id)
        await store.drop_lease(self.r, keys.feeder(batch_id), self.name)

    async def _let_go_all(self) -> None:
        for batch_id in list(self.renew_at):
            with contextlib.suppress(*REDIS_DOWN):
                await self._let_go(batch_id)
        for batch_id in list(self.cursors):
            await self._close(batch_id)
