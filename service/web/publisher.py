"""Validation of new batches, run inside every web process.

A new batch is queued in its shard's ``keys.pending_validation``; every web process looks at all
the shards' queues (``service/core/shards.py``). Any web process claims a batch by taking its
validator lease (``keys.validator``, with a fencing token: ``service/core/leases.py``), validates
every line (nothing runs before the whole file is valid) and moves it to ``in_progress``, in the
same step handing it to the feeders (``keys.feeding_batches``), which publish its lines a window
at a time (``feeder.py``). A process that takes over an expired lease redoes the validation; the
state change happens once, and every write is fenced by the lease: a validator paused past its
lease and resumed writes nothing (``fenced_write_refused``) for a batch a peer took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import AsyncGenerator

import msgspec
import structlog

from service.core import keys, leases, shards, store, tracing
from service.core.config import Provider, Settings
from service.core.connections import Outage
from service.core.delegation import Planner, encode_providers, write_plan
from service.core.leases import FencedScript, Lease, LeaseLost
from service.core.lifecycle import process_name
from service.core.loop import run_loop
from service.core.records import BatchField, BatchRecord
from service.core.storage import Storage
from service.core.validation import (
    MAX_LINE_BYTES,
    Block,
    IdHashes,
    Line,
    Request,
    check_line,
    duplicate_error,
    empty_error,
    id_hash,
    is_utf8,
    iter_blocks,
    model_error,
    quick_check,
    split_lines,
    too_many_error,
)
from service.core.wire import TERMINAL_STATUSES, BatchError

log = structlog.get_logger("sluice.publisher")

# Errors kept on a failed batch; a file with a million bad lines does not need a million entries.
MAX_REPORTED_ERRORS = 1000

# Batches looked at per claim: the first few due ones, in case peers hold some of them.
CLAIM_LOOKAHEAD = 8
# Bytes read from storage at a time while validating: fewer, larger reads (each a hop to a thread
# for local files) for a few MB of memory.
VALIDATION_READ_BYTES = 1024 * 1024
# Models whose provider one validation remembers.
MAX_CACHED_MODELS = 1000
# With nothing to validate, how long until the queue is looked at again (a new batch wakes it sooner).
IDLE_S = 1.0

# Creates each stream with its group (groups[i] for streams[i]), once.
_CREATE_GROUPS = FencedScript(
    keys=("*streams",),
    args=("*groups",),
    source="""
for i = 1, #KEYS do
  local reply = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[i], '0', 'MKSTREAM')
  if type(reply) == 'table' and reply.err and not string.find(reply.err, 'BUSYGROUP', 1, true) then
    return reply
  end
end
return 1
""",
)


class Publisher:
    """Claims pending batches, validates them and publishes their lines."""

    def __init__(
        self, r: store.Redis, storage: Storage, settings: Settings, feeder_wake: asyncio.Event, name: str | None = None
    ) -> None:
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
        await run_loop(self.step, stop=stop, outage=Outage(log), log=log, error_event="publisher_error", wake=self.wake)

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
        for batch_id, _ in await shards.due(self.r, keys.pending_validation, now, CLAIM_LOOKAHEAD):
            lease = await leases.take(self.r, keys.validator(batch_id), self.name, self.lease_ms)
            if lease is None:
                continue  # a peer is validating it
            # Peers skip it while the lease lasts; if this process dies, it is due again then.
            await leases.execute(
                self.r, lease, ("ZADD", _pending(batch_id), "XX", now + self.lease_ms / 1000, batch_id)
            )
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
        await leases.execute(
            self.r, lease, ("ZADD", _pending(batch_id), "XX", time.time() + self.lease_ms / 1000, batch_id)
        )
        self.renew_at = time.monotonic() + self.lease_ms / 4000

    async def process(self, batch_id: str, lease: Lease) -> None:
        """Validate one claimed batch and start it (or fail or cancel it); every write fenced by ``lease``."""
        h = await store.get_batch_record(self.r, batch_id)
        bound = log.bind(batch_id=batch_id)
        if h is None or h.status in TERMINAL_STATUSES:
            if h is not None:
                await store.release(self.r, self.storage, h, lease=lease)  # an ending interrupted before its release
            await leases.execute(self.r, lease, ("ZREM", _pending(batch_id), batch_id))
            return
        if h.status == "validating":
            started = time.monotonic()
            with tracing.phase(h, "sluice.validation"):
                total, size, model, errors, planner = await self._validate(h, lease)
                bound.info(
                    "validated",
                    lines=total,
                    errors=len(errors),
                    seconds=round(time.monotonic() - started, 3),
                    delegated=planner.lines,
                )
            if errors:
                await self._fail(h, errors, lease)
                return
            if not await self._start(h, total, model, self.settings.window(size, total), planner, lease):
                return
            self.feeder_wake.set()
        elif h.status == "cancelling" and not h.in_progress_at:
            await self._cancel_unstarted(h, lease)
            return
        await leases.execute(self.r, lease, ("ZREM", _pending(batch_id), batch_id))

    async def _validate(self, h: BatchRecord, lease: Lease) -> tuple[int, int, str, list[BatchError], Planner]:
        """(request lines, bytes up to the last one, first model, errors, delegation plan) of the batch's input.

        One pass checks every line, a block of lines at a time, and keeps only a hash of each
        custom_id (memory stays flat in the number of lines). When a hash comes up twice, a second
        pass tells real duplicates from collisions exactly, so a collision never fails a valid file.
        """
        planner = Planner(self.settings, h.completion_window)
        scan = _Scan(self.settings, h, planner)
        try:
            async with self._blocks(h) as blocks:
                async for block in blocks:
                    if scan.add(block):
                        break
                    await self._renew(h.id, lease)
            suspects = scan.suspects()
            if suspects:
                await self._recheck(h, lease, scan, suspects)
        except FileNotFoundError:
            return (
                0,
                0,
                "",
                [
                    BatchError(
                        code="invalid_request",
                        message=f"Cannot find file {h.input_file_id}.",
                        param="file_id",
                        line=None,
                    )
                ],
                planner,
            )
        errors = scan.errors
        if scan.total == 0:
            errors.append(empty_error())
        if scan.too_many:
            errors.append(too_many_error(self.settings.max_batch_lines))
        return scan.total, scan.size, scan.model, errors[:MAX_REPORTED_ERRORS], planner

    def _blocks(self, h: BatchRecord) -> contextlib.aclosing[AsyncGenerator[Block, None]]:
        # Closed on the way out: a read-ahead may be under way when validation stops early.
        return contextlib.aclosing(
            iter_blocks(self.storage, h.input_key, chunk_size=VALIDATION_READ_BYTES, read_ahead=True)
        )

    async def _recheck(self, h: BatchRecord, lease: Lease, scan: "_Scan", suspects: set[int]) -> None:
        """The second pass: the exact errors of the lines whose custom_id hash is in ``suspects``
        (duplicate_custom_id or model_not_found), in place of the first pass's in ``scan.errors``."""
        found: list[BatchError] = []
        seen: set[str] = set()
        lines = scan.checked  # the lines the first pass checked (up to the limit, or to enough errors)
        async with self._blocks(h) as blocks:
            async for block in blocks:
                if lines == 0 or len(found) >= MAX_REPORTED_ERRORS:
                    break
                quick = block.data is not None and is_utf8(block.data)
                for line in itertools.islice(block.lines(), lines):
                    lines -= 1
                    result = scan.classify(line, quick)
                    if isinstance(result, BatchError):
                        continue
                    custom_id, model = result
                    if id_hash(custom_id) not in suspects:
                        continue
                    if custom_id in seen:
                        found.append(duplicate_error(line.number))
                    elif scan.provider(model) is None:
                        found.append(model_error(model, line.number))
                    else:
                        seen.add(custom_id)
                await self._renew(h.id, lease)
        kept = [e for e in scan.errors if e.line not in scan.unserved or scan.unserved[e.line] not in suspects]
        scan.errors = list(heapq.merge(kept, found, key=lambda e: e.line or 0))

    async def _fail(self, h: BatchRecord, errors: list[BatchError], lease: Lease) -> None:
        now = store.now()
        encoded = msgspec.json.encode(errors).decode()
        applied, before = await store.transition(
            self.r,
            h.id,
            allowed=["validating"],
            fields={BatchField.STATUS: "failed", BatchField.FAILED_AT: now, BatchField.ERRORS: encoded},
            expire_s=self.settings.retention_s,
            delete=_work_keys_but(lease),
            lease=lease,
        )
        if not applied and before == "cancelling":
            await self._cancel_unstarted(h, lease)
            return
        if applied:
            tracing.batch_finished(h, "failed")
        # Released before it leaves the queue: interrupted in between, the next claim releases it.
        await store.release(self.r, self.storage, h, lease=lease)
        await leases.execute(self.r, lease, ("ZREM", _pending(h.id), h.id))

    async def _cancel_unstarted(self, h: BatchRecord, lease: Lease) -> None:
        # Cancelled before any line was published: nothing ran, so there is nothing to drain (the
        # streams an earlier, interrupted attempt may have created go in the same step).
        applied, _ = await store.transition(
            self.r,
            h.id,
            allowed=["cancelling"],
            fields={BatchField.STATUS: "cancelled", BatchField.CANCELLED_AT: store.now()},
            expire_s=self.settings.retention_s,
            delete=_work_keys_but(lease),
            lease=lease,
        )
        if applied:
            tracing.batch_finished(h, "cancelled")
        await store.release(self.r, self.storage, h, lease=lease)
        await leases.execute(self.r, lease, ("ZREM", _pending(h.id), h.id))

    async def _start(
        self,
        h: BatchRecord,
        total: int,
        model: str,
        window: int,
        planner: Planner,
        lease: Lease,
    ) -> bool:
        batch_id = h.id
        await _CREATE_GROUPS(
            self.r,
            streams=[keys.lines(batch_id), keys.results(batch_id)],
            groups=[keys.WORKER_GROUP, "finalizer"],
            lease=lease,
        )
        F = BatchField
        fields: dict[str, str | int] = {
            F.STATUS: "in_progress",
            F.IN_PROGRESS_AT: store.now(),
            F.TOTAL: total,
            F.MODEL: model,
            F.FEED_INDEX: 0,
            F.FEED_OFFSET: 0,
            F.FEED_WINDOW: window,
            **tracing.running_fields(h),
        }
        # Lines for a provider's own Batch API are run by the finalizers (workers/delegate.py); the
        # workers and the feeder only see the batch if some of its lines are executed here.
        add_to: list[shards.ShardKey] = [keys.live_batches]
        if planner.lines < total:
            add_to += [keys.active_batches, keys.feeding_batches]
        parts = planner.plan()
        if parts:
            await write_plan(self.r, batch_id, parts)
            fields.update(
                {
                    F.DELEG_OPEN: len(parts),
                    F.DELEG_LINES: planner.lines,
                    F.DELEG_PROVIDERS: encode_providers(planner.providers),
                }
            )
            add_to.append(keys.delegated_batches)
        applied, before = await store.transition(
            self.r,
            batch_id,
            allowed=["validating"],
            fields=fields,
            add_to=add_to,
            lease=lease,
        )
        if applied:
            return True
        if before == "cancelling":
            await self._cancel_unstarted(h, lease)
        elif before in TERMINAL_STATUSES or not before:
            # Ended meanwhile (its record expired or was deleted): the streams created above would
            # outlive the batch.
            await leases.execute(self.r, lease, ("DEL", *_work_keys_but(lease)), ("ZREM", _pending(batch_id), batch_id))
        return False


def _pending(batch_id: str) -> str:
    """The validation queue of the batch's shard."""
    return keys.pending_validation(keys.shard_of(batch_id))


def _work_keys_but(lease: Lease) -> list[str]:
    """The work keys of the batch whose validator lease this is, except the lease itself."""
    return [k for k in keys.work_keys(keys.batch_id_of(lease.key)) if k != lease.key]


class _Scan:
    """The first validation pass over a batch's input (``Publisher._validate``), a block at a time."""

    def __init__(self, settings: Settings, h: BatchRecord, planner: Planner) -> None:
        self.settings = settings
        self.endpoint = h.endpoint
        self.chosen = h.provider
        self.limit = settings.max_batch_lines
        self.planner = planner
        # The planner only has work when some provider takes this batch's lines to its Batch API.
        self.delegating = any(p.delegates(planner.completion_window, planner.window_s) for p in settings.providers)
        self.providers: dict[str, Provider | None] = {}
        self.ids = IdHashes()  # hashes of the custom_ids of the valid lines
        # Line -> custom_id hash of the lines with a model nobody serves: duplicate_custom_id is
        # reported instead when an earlier valid line has the same id (the second pass knows).
        self.unserved: dict[int, int] = {}
        self.errors: list[BatchError] = []  # in line order
        self.total = self.size = self.checked = 0
        self.too_many = False
        self.model = ""

    def provider(self, model: str) -> Provider | None:
        """The provider the lines of ``model`` go to (remembered for the first models seen)."""
        try:
            return self.providers[model]
        except KeyError:
            provider = self.settings.provider_for(model, self.chosen)
            if len(self.providers) < MAX_CACHED_MODELS:
                self.providers[model] = provider
            return provider

    def classify(self, line: Line, quick: bool) -> tuple[str, str] | BatchError:
        """``(custom_id, model)`` of a valid line, else its error; ``quick``: the line is known UTF-8."""
        if quick and line.data is not None and (found := quick_check(line.data, self.endpoint)) is not None:
            return found
        result = check_line(line, self.endpoint)
        return result if isinstance(result, BatchError) else (result.custom_id, result.model)

    def add(self, block: Block) -> bool:
        """Check the lines of ``block``; True once nothing further can change the outcome."""
        if block.data is None:
            return self._line(Line(block.number, None, block.end), block.end, False)
        data = block.data
        quick = is_utf8(data)
        long = len(data) > MAX_LINE_BYTES
        fast = quick and not long and not self.delegating
        number, offset, end = block.number, block.offset, block.end
        endpoint, providers, limit = self.endpoint, self.providers, self.limit
        add_id = self.ids.add
        for raw in split_lines(data):
            offset += len(raw) + 1
            found = quick_check(raw, endpoint) if fast else None
            if found is not None and self.total < limit and providers.get(found[1]) is not None:
                # The common case, inlined: a valid line of a model already routed (see _checked).
                self.total += 1
                self.checked += 1
                self.size = offset if offset < end else end
                add_id(id_hash(found[0]))
                self.model = self.model or found[1]
            elif found is not None or (
                not fast and quick and not long and (found := quick_check(raw, endpoint)) is not None
            ):
                if self._valid(number, raw, min(offset, end), *found):
                    return True
            elif long and len(raw) > MAX_LINE_BYTES:
                if self._line(Line(number, None, min(offset, end)), min(offset, end), quick):
                    return True
            elif raw.strip():
                if self._line(Line(number, raw.rstrip(b"\r"), min(offset, end)), min(offset, end), quick):
                    return True
            number += 1
        return False

    def suspects(self) -> set[int]:
        """After the last block: the custom_id hashes whose lines the second pass must check."""
        found = self.ids.repeated()
        found.update(h for h in self.unserved.values() if self.ids.has(h))
        return found

    def _count(self, end: int) -> bool:
        self.total += 1
        self.size = end
        if self.total > self.limit:
            self.too_many = True
            return True
        self.checked += 1
        return False

    def _line(self, line: Line, end: int, quick: bool) -> bool:
        if self._count(end):
            return True
        result = self.classify(line, quick)
        if isinstance(result, BatchError):
            self.errors.append(result)
            if self.delegating:
                self.planner.add(self.checked - 1, line, None, None)
            return self._full()
        return self._checked(line.number, line.data, end, *result)

    def _valid(self, number: int, raw: bytes, end: int, custom_id: str, model: str) -> bool:
        if self._count(end):
            return True
        return self._checked(number, raw, end, custom_id, model)

    def _checked(self, number: int, raw: bytes | None, end: int, custom_id: str, model: str) -> bool:
        provider = self.provider(model)
        if provider is None:
            self.errors.append(model_error(model, number))
            self.unserved[number] = id_hash(custom_id)
        else:
            self.ids.add(id_hash(custom_id))
            self.model = self.model or model
        if self.delegating:
            request = Request(custom_id, b"", model, 0) if provider is not None else None
            self.planner.add(self.checked - 1, Line(number, raw.rstrip(b"\r") if raw else raw, end), request, provider)
        return self._full()

    def _full(self) -> bool:
        # The reported errors are the first ones by line (the second pass may change a line's
        # error, never whether it has one): once there are enough, no later line matters.
        return len(self.errors) >= MAX_REPORTED_ERRORS
