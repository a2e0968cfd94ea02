"""The finalizer: drains recorded results into output/error files and ends batches.

One finalizer works at a time (a Redis lock with a TTL; a second one waits as a standby).
Each tick, for every live batch:

1. An ``in_progress`` batch past ``expires_at`` is marked to abort with ``batch_expired``.
2. An aborting batch (cancelled or expired) whose in-flight lines have finished gets a
   ``batch_cancelled``/``batch_expired`` error result for every line without a result.
3. New results are appended to the batch's output and error files. The append is made at the
   offset recorded in Redis and the new offset is recorded after it, so a finalizer killed
   mid-write redoes the same append and no line appears twice or goes missing.
4. Once every line has a result, the files are registered and the batch reaches its terminal
   state (``completed``, ``cancelled`` or ``expired``); its work keys are deleted.

After each pass it starts sending the completion webhooks that are due (service/core/webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from redis.exceptions import ResponseError

from service.core import keys, store, tracing
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage, connect
from service.core.heartbeat import Heartbeat, Tally
from service.core.lifecycle import process_name, run_until_signal, sleep_unless_stopped
from service.core.results import abort_line
from service.core.storage import Storage, open_storage
from service.core.store import Outcome
from service.core.validation import check_line, iter_lines
from service.core.webhooks import WebhookSender
from service.core.wire import TERMINAL_STATUSES

log = structlog.get_logger("sluice.finalizer")

TICK_S = 0.2
DRAIN_COUNT = 2000
ABORT_CHUNK = 500
SWEEP_EVERY_S = 60.0
OUTPUT_TTL_S = 30 * 24 * 3600

def _bit(bitmap: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> (index & 7)))


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class Finalizer:
    """The finalizer process's state."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.name = process_name()
        self.stop = asyncio.Event()
        self.active: bool | None = None  # unknown until the first attempt, so either outcome is logged
        # Short enough that a replacement takes over quickly, long enough to ride out a pause.
        self.lock_ttl_ms = int(min(10.0, settings.lease_s) * 1000)
        self.next_sweep = 0.0
        self.tally = Tally()
        self.ticked_at = time.monotonic()  # end of the last complete tick
        self.live = 0

    def _beat_fields(self) -> dict[str, str | int | float]:
        """What the finalizer's heartbeat says (see ``service.heartbeat``)."""
        return {"state": "active" if self.active else "standby", "live_batches": self.live,
                "since_tick_s": round(time.monotonic() - self.ticked_at, 3)}

    async def run(self) -> None:
        """Tick until ``stop`` is set."""
        self.redis = connect(self.settings, max_connections=8)
        log.info("finalizer_started", name=self.name)
        outage = Outage(log)
        heartbeat = Heartbeat(self.redis, self.name, "finalizer", tally=self.tally, fields=self._beat_fields)
        heartbeat.start()
        webhooks = WebhookSender(self.redis, self.settings)
        try:
            while not self.stop.is_set():
                try:
                    if await self._hold_lock():
                        await self.tick()
                        webhooks.start_pass()  # in a task of its own: never holds finalization up
                    self.ticked_at = time.monotonic()
                    outage.ok()
                except REDIS_DOWN as e:
                    await self._sleep(outage.failed(e))
                    continue
                await self._sleep(TICK_S)
        finally:
            if self.active:
                with contextlib.suppress(*REDIS_DOWN):
                    await store.drop_lease(self.redis, keys.FINALIZER_LOCK, self.name)
            self.active = False
            await webhooks.aclose()
            await heartbeat.close()
            await self.redis.aclose()
            await self.storage.aclose()
        log.info("finalizer_stopped")

    async def _hold_lock(self) -> bool:
        held = await store.hold_lease(self.redis, keys.FINALIZER_LOCK, self.name, self.lock_ttl_ms)
        if held != self.active:
            log.info("finalizer_active" if held else "finalizer_standby")
            self.active = held
        return held

    async def tick(self) -> None:
        """One pass over every live batch, and now and then over expired files."""
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + SWEEP_EVERY_S
            if swept := await store.sweep_expired_files(self.redis, self.storage):
                log.info("files_expired", files=swept)
        live = await self.redis.smembers(keys.LIVE_BATCHES)
        self.live = len(live)
        for raw in live:
            batch_id = raw.decode()
            try:
                await self.advance(batch_id)
            except REDIS_DOWN:
                raise
            except Exception:
                log.exception("finalize_failed", batch_id=batch_id)

    async def advance(self, batch_id: str) -> None:
        """Move one batch as far as it can go now."""
        h = await store.get_batch_record(self.redis, batch_id)
        if h is None or h["status"] in TERMINAL_STATUSES:
            # A finish interrupted after its transition: complete the clean-up.
            await self.redis.delete(*keys.work_keys(batch_id))
            await self.redis.srem(keys.LIVE_BATCHES, batch_id)
            await self.redis.srem(keys.FEEDING_BATCHES, batch_id)
            return
        if h["status"] == "in_progress" and not h.get("abort") and time.time() >= int(h["expires_at"]):
            await store.transition(self.redis, batch_id, allowed=["in_progress"], fields={"abort": "batch_expired"},
                                   remove_from=[keys.ACTIVE_BATCHES])
            log.info("batch_expiring", batch_id=batch_id)
            h = await store.get_batch_record(self.redis, batch_id) or h
        if h.get("abort") and not self._all_done(h):
            await self._abort_remaining(h)
        h = await self._drain(h)
        if self._all_done(h) and int(h.get("fin_out_lines", 0)) + int(h.get("fin_err_lines", 0)) == int(h["total"]):
            await self._finish(h)

    @staticmethod
    def _all_done(h: dict[str, str]) -> bool:
        total = int(h.get("total") or 0)
        return total > 0 and int(h.get("completed") or 0) + int(h.get("failed") or 0) >= total

    async def _abort_remaining(self, h: dict[str, str]) -> None:
        batch_id = h["id"]
        if not await self._in_flight_settled(batch_id):
            return
        reason = h["abort"]
        bitmap = await self.redis.get(keys.done(batch_id)) or b""
        pending: list[tuple[int, str, str, bytes]] = []
        index = -1
        async for line in iter_lines(self.storage, h["input_key"]):
            index += 1
            if _bit(bitmap, index):
                continue
            request = check_line(line, h["endpoint"])
            custom_id = getattr(request, "custom_id", "")
            pending.append((index, "", Outcome.FAILED, abort_line(custom_id, reason)))
            if len(pending) >= ABORT_CHUNK:
                await store.record_results(self.redis, batch_id, pending)
                pending = []
        await store.record_results(self.redis, batch_id, pending)
        log.info("batch_aborted", batch_id=batch_id, reason=reason)

    async def _in_flight_settled(self, batch_id: str) -> bool:
        """True when no line of the batch is still being worked on by a live worker."""
        try:
            summary = await self.redis.xpending(keys.lines(batch_id), keys.WORKER_GROUP)
        except ResponseError:
            return True  # no stream or group: nothing was ever handed out
        if not summary["pending"]:
            return True
        # Live workers renew their leases; entries idle longer than a lease belong to dead ones.
        stale = await self.redis.xpending_range(
            keys.lines(batch_id), keys.WORKER_GROUP, min="-", max="+", count=summary["pending"],
            idle=int(self.settings.lease_s * 1000),
        )
        return len(stale) == summary["pending"]

    async def _drain(self, h: dict[str, str]) -> dict[str, str]:
        batch_id = h["id"]
        stream = keys.results(batch_id)
        cursor = h.get("fin_cursor") or "0-0"
        offsets = {name: int(h.get(f"fin_{name}_bytes") or 0) for name in ("out", "err")}
        counts = {name: int(h.get(f"fin_{name}_lines") or 0) for name in ("out", "err")}
        while True:
            entries = await self.redis.xrange(stream, min=f"({cursor}", max="+", count=DRAIN_COUNT)
            if not entries:
                return h
            chunks: dict[str, list[bytes]] = {"out": [], "err": []}
            for _, fields in entries:
                chunks["out" if fields[b"o"] == Outcome.COMPLETED.encode() else "err"].append(fields[b"r"])
            for name, lines in chunks.items():
                if lines:
                    data = b"\n".join(lines) + b"\n"
                    offsets[name] = await self.storage.append(self._spool_key(batch_id, name), data, offsets[name])
                    counts[name] += len(lines)
            cursor = entries[-1][0].decode()
            update = {
                "fin_cursor": cursor,
                "fin_out_bytes": offsets["out"], "fin_err_bytes": offsets["err"],
                "fin_out_lines": counts["out"], "fin_err_lines": counts["err"],
            }
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(keys.batch(batch_id), mapping=update)
            pipe.xtrim(stream, minid=_next_id(cursor), approximate=False)
            await pipe.execute()
            h = {**h, **{k: str(v) for k, v in update.items()}}

    @staticmethod
    def _spool_key(batch_id: str, name: str) -> str:
        return f"{batch_id}_{'output' if name == 'out' else 'error'}.jsonl"

    async def _finish(self, h: dict[str, str]) -> None:
        batch_id = h["id"]
        now = store.now()
        finishing_since = time.time_ns()
        if h["status"] == "in_progress" and not h.get("abort"):
            applied, _ = await store.transition(self.redis, batch_id, allowed=["in_progress"],
                                                fields={"status": "finalizing", "finalizing_at": now})
            if not applied:
                return  # cancelled at the last moment: the next tick finishes it as cancelled
            h["status"] = "finalizing"
        if h["status"] == "finalizing":
            final, stamp, allowed = "completed", "completed_at", ["finalizing"]
        elif h["status"] == "cancelling":
            final, stamp, allowed = "cancelled", "cancelled_at", ["cancelling"]
        else:
            final, stamp, allowed = "expired", "expired_at", ["in_progress"]
        file_ids = {name: await self._register_file(h, name) for name in ("out", "err")}
        applied, _ = await store.transition(
            self.redis, batch_id, allowed=allowed,
            fields={"status": final, stamp: now,
                    "output_file_id": file_ids["out"] or "", "error_file_id": file_ids["err"] or ""},
            remove_from=[keys.LIVE_BATCHES, keys.ACTIVE_BATCHES, keys.FEEDING_BATCHES],
            expire_s=self.settings.retention_s,
        )
        if not applied:
            return
        tracing.batch_finished(h, final, finishing_since)
        await self.redis.delete(*keys.work_keys(batch_id))
        await self.redis.zrem(keys.PENDING_VALIDATION, batch_id)
        await store.release(self.redis, self.storage, h)
        log.info("batch_finished", batch_id=batch_id, status=final, completed=h.get("completed"),
                 failed=h.get("failed"), total=h.get("total"), **tracing.log_fields(h))

    async def _register_file(self, h: dict[str, str], name: str) -> str | None:
        """Create the output or error file record; the same id on every retry (exactly once)."""
        if int(h.get(f"fin_{name}_lines") or 0) == 0:
            return None
        field = f"fin_{name}_file"
        if not h.get(field):
            file_id, seq = await store.new_id(self.redis, "file-")
            await self.redis.hsetnx(keys.batch(h["id"]), field, f"{file_id}:{seq}")
            h[field] = (await self.redis.hget(keys.batch(h["id"]), field)).decode()
        file_id, seq = h[field].split(":")
        created = store.now()
        ttl = int(h["output_expires_after"]) if h.get("output_expires_after") else OUTPUT_TTL_S
        await store.create_file(
            self.redis, owner=h["owner"], file_id=file_id, seq=int(seq),
            filename=self._spool_key(h["id"], name), purpose="batch_output",
            size=int(h[f"fin_{name}_bytes"]), storage_key=self._spool_key(h["id"], name),
            expires_at=created + ttl, created_at=created, charge=True,
        )
        return file_id

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(self.stop, seconds)


def run(settings: Settings) -> None:
    """``sluice finalizer``: run the finalizer (or a standby) until SIGTERM/SIGINT."""
    run_until_signal("finalizer", settings, lambda: Finalizer(settings, open_storage(settings)))
