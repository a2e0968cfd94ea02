"""Validation of new batches, run inside every web process.

A new batch is queued in ``keys.PENDING_VALIDATION``. Any web process claims it by taking its
validator lease (``keys.validator``, with a fencing token: ``service/core/leases.py``), validates
every line (nothing runs before the whole file is valid) and moves it to ``in_progress``, in the
same step handing it to the feeders (``keys.FEEDING_BATCHES``), which publish its lines a window
at a time (``feeder.py``). A process that takes over an expired lease redoes the validation; the
state change happens once, and every write is fenced by the lease: a validator paused past its
lease and resumed writes nothing (``fenced_write_refused``) for a batch a peer took over.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from service.core import keys, leases, store, tracing
from service.core.config import Settings
from service.core.connections import Outage
from service.core.delegation import Planner, encode_providers, write_plan
from service.core.leases import FencedScript, Lease, LeaseLost
from service.core.lifecycle import process_name
from service.core.loop import run_loop
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

# Batches looked at per claim: the first few due ones, in case peers hold some of them.
CLAIM_LOOKAHEAD = 8
# Lines validated between looks at the clock (to renew the lease in time).
RENEW_CHECK_LINES = 500
# With nothing to validate, how long until the queue is looked at again (a new batch wakes it sooner).
IDLE_S = 1.0

# KEYS: streams. ARGV: the consumer group of each. Creates each stream with its group, once.
_CREATE_GROUPS = FencedScript("""
for i = 1, #KEYS do
  local reply = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[i], '0', 'MKSTREAM')
  if type(reply) == 'table' and reply.err and not string.find(reply.err, 'BUSYGROUP', 1, true) then
    return reply
  end
end
return 1
""")


class Publisher:
    """Claims pending batches, validates them and publishes their lines."""

    def __init__(self, r: store.Redis, storage: Storage, settings: Settings, feeder_wake: asyncio.Event,
                 name: str | None = None) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.wake = asyncio.Event()
        self.feeder_wake = feeder_wake
        self.name = name or process_name()
        # Short enough that a peer takes over soon after a crash, long enough to ride out a pause.
        self.lease_ms = int(min(10.0, settings.lease_s) * 1000)
        self.renew_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; ``wake`` shortens the wait after a batch is created."""
        await run_loop(self.step, stop=stop, outage=Outage(log), log=log, error_event="publisher_error",
                       wake=self.wake)

    async def step(self) -> float:
        """Claim one due batch and validate it; how long to wait before the next pass."""
        claimed = await self._claim()
        if claimed is None:
            return IDLE_S
        batch_id, lease = claimed
        try:
            await self.process(batch_id, lease)
        except LeaseLost as e:
            # Paused past the lease: a peer validates this batch now.
            log.warning("fenced_write_refused", batch_id=batch_id, error=str(e))
            return 0.0
        await leases.drop(self.r, lease)
        return 0.0

    async def _claim(self) -> tuple[str, Lease] | None:
        """A due batch whose validator lease this process just took, or None."""
        now = time.time()
        for raw in await self.r.zrangebyscore(keys.PENDING_VALIDATION, "-inf", now, start=0, num=CLAIM_LOOKAHEAD):
            batch_id = raw.decode()
            lease = await leases.take(self.r, keys.validator(batch_id), self.name, self.lease_ms)
            if lease is None:
                continue  # a peer is validating it
            # Peers skip it while the lease lasts; if this process dies, it is due again then.
            await leases.execute(self.r, lease, ("ZADD", keys.PENDING_VALIDATION, "XX", now + self.lease_ms / 1000,
                                                 batch_id))
            self.renew_at = time.monotonic() + self.lease_ms / 4000
            return batch_id, lease
        return None

    async def _renew(self, batch_id: str, lease: Lease) -> None:
        """Keep the lease while validation runs; ``LeaseLost`` once a pause let it go."""
        if time.monotonic() < self.renew_at:
            return
        if not await leases.renew(self.r, lease, self.lease_ms):
            log.warning("lease_lost", batch_id=batch_id, lease=lease.key, token=lease.token)
            raise LeaseLost(f"{lease.key} is no longer held by {lease.value}")
        await leases.execute(self.r, lease, ("ZADD", keys.PENDING_VALIDATION, "XX",
                                             time.time() + self.lease_ms / 1000, batch_id))
        self.renew_at = time.monotonic() + self.lease_ms / 4000

    async def process(self, batch_id: str, lease: Lease) -> None:
        """Validate one claimed batch and start it (or fail or cancel it); every write fenced by ``lease``."""
        h = await store.get_batch_record(self.r, batch_id)
        bound = log.bind(batch_id=batch_id)
        if h is None or h["status"] in TERMINAL_STATUSES:
            if h is not None:
                await store.release(self.r, self.storage, h, lease=lease)  # an ending interrupted before its release
            await leases.execute(self.r, lease, ("ZREM", keys.PENDING_VALIDATION, batch_id))
            return
        if h["status"] == "validating":
            started = time.monotonic()
            with tracing.phase(h, "sluice.validation"):
                total, size, model, errors, planner = await self._validate(h, lease)
                bound.info("validated", lines=total, errors=len(errors),
                           seconds=round(time.monotonic() - started, 3), delegated=planner.lines)
            if errors:
                await self._fail(h, errors, lease)
                return
            if not await self._start(h, total, model, self.settings.window(size, total), planner, lease):
                return
            self.feeder_wake.set()
        elif h["status"] == "cancelling" and not h.get("in_progress_at"):
            await self._cancel_unstarted(h, lease)
            return
        await leases.execute(self.r, lease, ("ZREM", keys.PENDING_VALIDATION, batch_id))

    async def _validate(self, h: dict[str, str], lease: Lease) -> tuple[int, int, str, list[BatchError], Planner]:
        """(request lines, bytes up to the last one, first model, errors, delegation plan) of the batch's input."""
        limit = self.settings.max_batch_lines
        errors: list[BatchError] = []
        seen: set[str] = set()
        total = size = 0
        model = ""
        planner = Planner(self.settings, h["completion_window"])
        try:
            async for line in iter_lines(self.storage, h["input_key"]):
                total += 1
                size = line.end
                if total > limit:
                    errors.append(too_many_error(limit))
                    break
                result = check_line(line, h["endpoint"])
                provider = None
                if isinstance(result, BatchError):
                    errors.append(result)
                elif result.custom_id in seen:
                    errors.append(duplicate_error(line.number))
                elif (provider := self.settings.provider_for(result.model, h.get("provider", ""))) is None:
                    errors.append(model_error(result.model, line.number))
                else:
                    seen.add(result.custom_id)
                    model = model or result.model
                request = None if isinstance(result, BatchError) or provider is None else result
                planner.add(total - 1, line, request, provider)
                if total % RENEW_CHECK_LINES == 0:
                    await self._renew(h["id"], lease)
        except FileNotFoundError:
            return 0, 0, "", [BatchError(
                code="invalid_request", message=f"Cannot find file {h['input_file_id']}.", param="file_id", line=None,
            )], planner
        if total == 0:
            errors.append(empty_error())
        return total, size, model, errors[:MAX_REPORTED_ERRORS], planner

    async def _fail(self, h: dict[str, str], errors: list[BatchError], lease: Lease) -> None:
        now = store.now()
        encoded = msgspec.json.encode(errors).decode()
        applied, before = await store.transition(
            self.r, h["id"], allowed=["validating"],
            fields={"status": "failed", "failed_at": now, "errors": encoded}, expire_s=self.settings.retention_s,
            delete=_work_keys_but(lease), lease=lease,
        )
        if not applied and before == "cancelling":
            await self._cancel_unstarted(h, lease)
            return
        if applied:
            tracing.batch_finished(h, "failed")
        # Released before it leaves the queue: interrupted in between, the next claim releases it.
        await store.release(self.r, self.storage, h, lease=lease)
        await leases.execute(self.r, lease, ("ZREM", keys.PENDING_VALIDATION, h["id"]))

    async def _cancel_unstarted(self, h: dict[str, str], lease: Lease) -> None:
        # Cancelled before any line was published: nothing ran, so there is nothing to drain (the
        # streams an earlier, interrupted attempt may have created go in the same step).
        applied, _ = await store.transition(
            self.r, h["id"], allowed=["cancelling"], fields={"status": "cancelled", "cancelled_at": store.now()},
            expire_s=self.settings.retention_s, delete=_work_keys_but(lease), lease=lease,
        )
        if applied:
            tracing.batch_finished(h, "cancelled")
        await store.release(self.r, self.storage, h, lease=lease)
        await leases.execute(self.r, lease, ("ZREM", keys.PENDING_VALIDATION, h["id"]))

    async def _start(
        self, h: dict[str, str], total: int, model: str, window: int, planner: Planner, lease: Lease,
    ) -> bool:
        batch_id = h["id"]
        await _CREATE_GROUPS(self.r, [keys.lines(batch_id), keys.results(batch_id)], [keys.WORKER_GROUP, "finalizer"],
                             lease=lease)
        fields: dict[str, str | int] = {"status": "in_progress", "in_progress_at": store.now(), "total": total,
                                        "model": model, "feed_index": 0, "feed_offset": 0, "feed_window": window,
                                        **tracing.running_fields(h)}
        # Lines for a provider's own Batch API are run by the finalizers (workers/delegate.py); the
        # workers and the feeder only see the batch if some of its lines are executed here.
        add_to = [keys.LIVE_BATCHES]
        if planner.lines < total:
            add_to += [keys.ACTIVE_BATCHES, keys.FEEDING_BATCHES]
        parts = planner.plan()
        if parts:
            await write_plan(self.r, batch_id, parts)
            fields.update(deleg_open=len(parts), deleg_lines=planner.lines,
                          deleg_providers=encode_providers(planner.providers))
            add_to.append(keys.DELEGATED_BATCHES)
        applied, before = await store.transition(
            self.r, batch_id, allowed=["validating"], fields=fields, add_to=add_to, lease=lease,
        )
        if applied:
            return True
        if before == "cancelling":
            await self._cancel_unstarted(h, lease)
        elif before in TERMINAL_STATUSES or not before:
            # Ended meanwhile (its record expired or was deleted): the streams created above would
            # outlive the batch.
            await leases.execute(self.r, lease, ("DEL", *_work_keys_but(lease)),
                                 ("ZREM", keys.PENDING_VALIDATION, batch_id))
        return False


def _work_keys_but(lease: Lease) -> list[str]:
    """The work keys of the batch whose validator lease this is, except the lease itself."""
    return [k for k in keys.work_keys(keys.batch_id_of(lease.key)) if k != lease.key]
