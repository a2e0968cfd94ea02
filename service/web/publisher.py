"""Validation of new batches, run inside every web process.

A new batch is queued in ``keys.PENDING_VALIDATION``. Any web process claims it with a lease,
validates every line (nothing runs before the whole file is valid) and moves it to
``in_progress``, in the same step handing it to the feeders (``keys.FEEDING_BATCHES``), which
publish its lines a window at a time (``feeder.py``). A process that takes over an expired
lease redoes the validation; the state change happens once.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from redis.exceptions import ResponseError

from service.core import keys, store, tracing
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage, Script
from service.core.storage import Storage
from service.core.validation import (
    check_line,
    duplicate_error,
    empty_error,
    iter_lines,
    model_error,
    too_many_error,
)
from service.core.wire import TERMINAL_STATUSES, BatchError

log = structlog.get_logger("sluice.publisher")

# Errors kept on a failed batch; a file with a million bad lines does not need a million entries.
MAX_REPORTED_ERRORS = 1000

_CLAIM = Script("""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], ids[1])
return ids[1]
""")


class Publisher:
    """Claims pending batches, validates them and publishes their lines."""

    def __init__(self, r: store.Redis, storage: Storage, settings: Settings, feeder_wake: asyncio.Event) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.wake = asyncio.Event()
        self.feeder_wake = feeder_wake

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; ``wake`` shortens the wait after a batch is created."""
        outage = Outage(log)
        while not stop.is_set():
            try:
                batch_id = await self._claim()
                outage.ok()
                if batch_id is None:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
                    continue
                await self.process(batch_id)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:
                await asyncio.sleep(outage.failed(e))
            except Exception:
                log.exception("publisher_error")
                await asyncio.sleep(1.0)

    async def _claim(self) -> str | None:
        now = time.time()
        got = await _CLAIM(self.r, [keys.PENDING_VALIDATION], [now, now + self.settings.lease_s])
        return got.decode() if got else None

    async def _renew(self, batch_id: str) -> None:
        await self.r.zadd(keys.PENDING_VALIDATION, {batch_id: time.time() + self.settings.lease_s}, xx=True)

    async def process(self, batch_id: str) -> None:
        """Validate one claimed batch and start it (or fail or cancel it)."""
        h = await store.get_batch_record(self.r, batch_id)
        bound = log.bind(batch_id=batch_id)
        if h is None or h["status"] in TERMINAL_STATUSES:
            await self.r.zrem(keys.PENDING_VALIDATION, batch_id)
            return
        if h["status"] == "validating":
            started = time.monotonic()
            with tracing.phase(h, "sluice.validation"):
                total, size, model, errors = await self._validate(h)
                bound.info("validated", lines=total, errors=len(errors), seconds=round(time.monotonic() - started, 3))
            if errors:
                await self._fail(h, errors)
                return
            if not await self._start(h, total, model, self.settings.window(size, total)):
                return
            self.feeder_wake.set()
        elif h["status"] == "cancelling" and not h.get("in_progress_at"):
            await self._cancel_unstarted(h)
            return
        await self.r.zrem(keys.PENDING_VALIDATION, batch_id)

    async def _validate(self, h: dict[str, str]) -> tuple[int, int, str, list[BatchError]]:
        """(request lines, bytes up to the last one, first model, errors) of the batch's input."""
        limit = self.settings.max_batch_lines
        errors: list[BatchError] = []
        seen: set[str] = set()
        total = size = 0
        model = ""
        try:
            async for line in iter_lines(self.storage, h["input_key"]):
                total += 1
                size = line.end
                if total > limit:
                    errors.append(too_many_error(limit))
                    break
                result = check_line(line, h["endpoint"])
                if isinstance(result, BatchError):
                    errors.append(result)
                elif result.custom_id in seen:
                    errors.append(duplicate_error(line.number))
                elif self.settings.provider_for(result.model, h.get("provider", "")) is None:
                    errors.append(model_error(result.model, line.number))
                else:
                    seen.add(result.custom_id)
                    model = model or result.model
                if total % 5000 == 0:
                    await self._renew(h["id"])
        except FileNotFoundError:
            return 0, 0, "", [BatchError(
                code="invalid_request", message=f"Cannot find file {h['input_file_id']}.", param="file_id", line=None,
            )]
        if total == 0:
            errors.append(empty_error())
        return total, size, model, errors[:MAX_REPORTED_ERRORS]

    async def _fail(self, h: dict[str, str], errors: list[BatchError]) -> None:
        now = store.now()
        encoded = msgspec.json.encode(errors).decode()
        applied, before = await store.transition(
            self.r, h["id"], allowed=["validating"],
            fields={"status": "failed", "failed_at": now, "errors": encoded}, expire_s=self.settings.retention_s,
        )
        if not applied and before == "cancelling":
            await self._cancel_unstarted(h)
            return
        if applied:
            tracing.batch_finished(h, "failed")
        await self.r.zrem(keys.PENDING_VALIDATION, h["id"])
        await store.release(self.r, self.storage, h)

    async def _cancel_unstarted(self, h: dict[str, str]) -> None:
        # Cancelled before any line was published: nothing ran, so there is nothing to drain.
        applied, _ = await store.transition(
            self.r, h["id"], allowed=["cancelling"], fields={"status": "cancelled", "cancelled_at": store.now()},
            expire_s=self.settings.retention_s,
        )
        if applied:
            tracing.batch_finished(h, "cancelled")
        await self.r.zrem(keys.PENDING_VALIDATION, h["id"])
        await store.release(self.r, self.storage, h)

    async def _start(self, h: dict[str, str], total: int, model: str, window: int) -> bool:
        batch_id = h["id"]
        for stream, group in ((keys.lines(batch_id), keys.WORKER_GROUP), (keys.results(batch_id), "finalizer")):
            try:
                await self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        applied, before = await store.transition(
            self.r, batch_id, allowed=["validating"],
            fields={"status": "in_progress", "in_progress_at": store.now(), "total": total, "model": model,
                    "feed_index": 0, "feed_offset": 0, "feed_window": window, **tracing.running_fields(h)},
            add_to=[keys.LIVE_BATCHES, keys.ACTIVE_BATCHES, keys.FEEDING_BATCHES],
        )
        if applied:
            return True
        if before == "cancelling":
            await self.r.delete(*keys.work_keys(batch_id))
            await self._cancel_unstarted(h)
        elif before in TERMINAL_STATUSES or not before:
            # A peer whose lease had run out started and finished it meanwhile: the streams
            # created above would outlive the batch.
            await self.r.delete(*keys.work_keys(batch_id))
        return False
