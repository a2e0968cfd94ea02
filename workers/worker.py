"""The consumer-group worker: pull request lines, call the provider, record each result.

Loop, top to bottom:

1. Wait for a free slot (at most ``SLUICE_WORKER_CONCURRENCY`` requests in flight).
2. Read new lines from the streams of the active batches, never more entries than free slots
   (entries read but not started would sit where nobody can take them). Which batches, and how
   many lines each, is decided by ``scheduling.py``: tokens share equally, a token's batches by
   priority, and batches at risk of missing their deadline go first.
3. Lines of a batch being cancelled or expired are recorded as such, without being sent.
4. Every other line runs as its own task: provider call with retries, then one Lua script records
   the result exactly once (done bitmap), bumps the batch counter and acks + deletes the entry;
   results finishing together share one round trip (``recorder.py``).

A background task renews the lease (XCLAIM ... IDLE 0 JUSTID) of the lines in flight, so a slow
provider call is never taken for a dead worker's; only of lines this worker still owns, so a
worker resuming from a pause (SIGSTOP, a frozen VM) never takes back lines reclaimed meanwhile.
If it finishes such a line anyway, the done bitmap makes its result a no-op (exactly once). On
SIGTERM the worker stops reading, lets in-flight requests finish within the grace period and
leaves the rest pending for others.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog
from redis.exceptions import ResponseError
from structlog.typing import FilteringBoundLogger

from service.core import keys, shards, store, streams, tracing
from service.core.config import Settings
from service.core.connections import BLOCK_MS, REDIS_DOWN, Outage, Script, connect
from service.core.counters import Attempts
from service.core.crypto import unseal
from service.core.heartbeat import Heartbeat, Tally
from service.core.lifecycle import process_name, run_until_signal
from service.core.loop import run_loop, wait_first
from service.core.records import BatchField
from service.core.results import abort_line, error_line
from service.core.store import Outcome

from .limits import Limiter
from .recorder import Recorder
from .scheduling import Candidate, Deadlines, Scheduler, weight
from .upstream import CallResult, Upstream

log = structlog.get_logger("sluice.worker")

# Also how soon an idle worker notices a new batch.
IDLE_WAIT_S = 0.1
# How stale the worker's view of the running batches may be (new batches are noticed within it):
# short while it knows of none, so a first batch starts at once; longer while it has batches to
# work on, since the view is 16 reads (one per shard) and a busy worker gains little from a
# newcomer noticed sooner (one that ended meanwhile only answers NOGROUP).
ACTIVE_REFRESH_S = 0.1
ACTIVE_REFRESH_BUSY_S = 0.5
# How long a stopping worker waits for its last results to reach Redis.
RECORD_SETTLE_S = 5.0
POISON_CODE = "poison_line"

# Sets how long the group believes these entries of a batch's lines stream idle, for those this
# consumer still owns; returns how many.
_SET_IDLE = Script(
    keys=("stream",),
    args=("group", "consumer", "idle_ms", "*entry_ids"),
    source="""
local kept = 0
for i = 4, #ARGV do
  local owned = redis.call('XPENDING', KEYS.stream, ARGV.group, ARGV[i], ARGV[i], 1, ARGV.consumer)
  if #owned > 0 then
    redis.call('XCLAIM', KEYS.stream, ARGV.group, ARGV.consumer, 0, ARGV[i], 'IDLE', ARGV.idle_ms, 'JUSTID')
    kept = kept + 1
  end
end
return kept
""",
)
# How often the worker reads the running batches' progress (for their deadlines).
PROGRESS_S = 1.0
# With fewer than 1/READ_FILL_SHARE of its slots free, a worker waits up to READ_FILL_S for more to
# free before it reads: one read (and the admissions and records that follow it) then carries
# several lines instead of one, for a delay far below any provider's latency.
READ_FILL_SHARE = 4
READ_FILL_S = 0.002


@dataclass(frozen=True)
class Line:
    """One request line taken from a batch's stream."""

    batch_id: str
    entry_id: str
    index: int
    custom_id: str
    body: bytes
    provider: str
    cost: int
    queued_ns: int = 0  # when it was published, for a line traced (streams.LINE_QUEUED_NS); else 0

    @property
    def holder(self) -> str:
        """This line's name in a provider's concurrency leases."""
        return f"{self.batch_id}/{self.entry_id}"


@dataclass(frozen=True)
class BatchInfo:
    """What a worker needs to know of a batch; fixed once the batch runs."""

    owner: str
    endpoint: str
    sealed_key: str  # the client's own provider key (BYOK), encrypted; "" when none
    weight: int  # of its priority (scheduling.py)
    expires_at: float
    traceparent: str = ""  # the batch's trace (BatchField.TRACEPARENT); "" when not traced


class Worker:
    """One worker process's state: its Redis clients, its provider and its in-flight lines."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = process_name()
        self.stop = asyncio.Event()
        self.inflight: dict[asyncio.Task[None], Line] = {}
        self.batches: dict[str, BatchInfo] = {}
        self.scheduler = Scheduler()
        self.deadlines = Deadlines()
        self.progress_at = 0.0
        self.claim_cursors: dict[str, str] = {}
        self.active: list[str] = []
        self.candidates: list[Candidate] = []
        self.active_until = 0.0
        self.next_reclaim = 0.0
        self.log = log.bind(consumer=self.name)
        self.outage = Outage(self.log)
        self.tally = Tally()
        self.draining = False
        self.freed = asyncio.Event()  # a line in flight finished: its slot is free

    async def run(self) -> None:
        """Consume until ``stop`` is set, then drain within the grace period."""
        self.redis = connect(self.settings)
        connector = aiohttp.TCPConnector(limit=self.settings.worker_concurrency + 8, limit_per_host=0)
        # Timeouts are per provider, set on each request.
        async with aiohttp.ClientSession(connector=connector) as session:
            self.limiter = Limiter(self.redis, self.settings.lease_s, own_slots=self.settings.worker_concurrency)
            self.recorder = Recorder(self.redis, self.outage)
            self.upstream = Upstream(self.settings, session, self.limiter, self.tally)
            renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
            heartbeat = Heartbeat(self.redis, self.name, "worker", tally=self.tally, fields=self._beat_fields)
            heartbeat.start()
            self.log.info("worker_started", concurrency=self.settings.worker_concurrency)
            try:
                await run_loop(self.step, stop=self.stop, outage=self.outage, log=self.log, error_event="worker_error")
            finally:
                self.draining = True
                await self._drain()
                await self.limiter.aclose()
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                await heartbeat.close()
                await self.redis.aclose()
        self.log.info("worker_stopped")

    def _beat_fields(self) -> dict[str, str | int]:
        """What this worker's heartbeat says besides the counters (see ``service.heartbeat``)."""
        return {
            "state": "draining" if self.draining else "running",
            "in_flight": len(self.inflight),
            "concurrency": self.settings.worker_concurrency,
            "batches": len(self.batches),
        }

    # ------------------------------------------------------------------ the loop
    async def step(self) -> float:
        """One pass: read as many lines as there are free slots and start them; how long to wait
        before the next pass."""
        free = await self._free_slots()
        if free <= 0:
            return 0.0  # stopping
        plan = await self._pick_streams(free)
        if not plan:
            return IDLE_WAIT_S
        lines = await self._reclaim(sorted(self.batches), free)
        aborts = await self._aborts({line.batch_id for line in lines}) if lines else {}
        if not lines:
            lines, aborts, blocked = await self._read(plan)
            if not lines:
                # A blocking read has waited already.
                return 0.0 if blocked else IDLE_WAIT_S / 10
        await self._dispatch(lines, aborts)
        return 0.0

    async def _free_slots(self) -> int:
        """How many slots are free, once there is one; with few free, after waiting briefly for more
        (0 when the worker is stopping)."""
        concurrency = self.settings.worker_concurrency
        want = max(1, concurrency // READ_FILL_SHARE)
        free = concurrency - len(self.inflight)
        if free >= want or not self.inflight:
            return free
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_FILL_S if free > 0 else None
        while free < want and self.inflight:
            self.freed.clear()
            if deadline is None:
                # Stop-aware: a stopping worker starts its drain now, not once some call ends.
                freed = asyncio.ensure_future(self.freed.wait())
                try:
                    await wait_first(self.stop, [freed])
                finally:
                    freed.cancel()
                if self.stop.is_set():
                    return 0
            else:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):  # no task per wait, unlike wait_for
                        await self.freed.wait()
                except TimeoutError:
                    break
            free = concurrency - len(self.inflight)
            if deadline is None and free > 0:
                deadline = loop.time() + READ_FILL_S
        return free

    async def _pick_streams(self, free: int) -> dict[str, int]:
        """How many lines to read from which running batch: ``free`` in all, as scheduling.py decides."""
        active = await self._active()
        if not active:
            return {}
        await self._load_batches(active)
        await self._observe_progress()
        candidates = [
            Candidate(b, info.owner, info.weight, info.expires_at, self.deadlines.urgent(b))
            for b in active
            if (info := self.batches.get(b)) is not None
        ]
        self.candidates = candidates
        return self.scheduler.plan(candidates, free, asyncio.get_running_loop().time())

    async def _observe_progress(self) -> None:
        """Read the running batches' counters, at most every ``PROGRESS_S``, for their deadlines."""
        now = asyncio.get_running_loop().time()
        if now < self.progress_at:
            return
        self.progress_at = now + PROGRESS_S
        ids = sorted(self.batches)
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(keys.batch(batch_id), BatchField.TOTAL, BatchField.COMPLETED, BatchField.FAILED)
        wall = time.time()
        for batch_id, (total, completed, failed) in zip(ids, await pipe.execute()):
            self.deadlines.observe(
                batch_id,
                wall,
                int(completed or 0) + int(failed or 0),
                int(total or 0),
                self.batches[batch_id].expires_at,
            )
        self.deadlines.forget(set(ids))

    async def _active(self) -> list[str]:
        """The running batches (every shard's ``keys.active_batches``), looked up at most every
        ``ACTIVE_REFRESH_S`` (``ACTIVE_REFRESH_BUSY_S`` while there are some)."""
        now = asyncio.get_running_loop().time()
        if now >= self.active_until:
            self.active = await shards.members(self.redis, keys.active_batches)
            self.active_until = now + (ACTIVE_REFRESH_BUSY_S if self.active else ACTIVE_REFRESH_S)
        return self.active

    async def _load_batches(self, batch_ids: list[str]) -> None:
        missing = [b for b in batch_ids if b not in self.batches]
        if not missing:
            return
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in missing:
            pipe.hmget(
                keys.batch(batch_id),
                BatchField.OWNER,
                BatchField.ENDPOINT,
                BatchField.BYOK,
                BatchField.PRIORITY,
                BatchField.EXPIRES_AT,
                BatchField.TRACEPARENT,
            )
        for batch_id, (owner, endpoint, sealed, priority, expires_at, traceparent) in zip(
            missing, await pipe.execute()
        ):
            if owner and endpoint:
                self.batches[batch_id] = BatchInfo(
                    owner.decode(),
                    endpoint.decode(),
                    (sealed or b"").decode(),
                    weight((priority or b"").decode()),
                    float(expires_at or 0),
                    (traceparent or b"").decode(),
                )
        # Forget batches that ended, so the cache stays as small as the active set.
        for batch_id in set(self.batches) - set(batch_ids) - {line.batch_id for line in self.inflight.values()}:
            del self.batches[batch_id]

    async def _read(self, plan: dict[str, int]) -> tuple[list[Line], dict[str, str], bool]:
        """New lines for this worker (``plan``: how many from which batch), the abort reason of every
        batch read that has one, and whether the read waited for new lines (a blocking read).

        The abort reasons come in the same round trip, looked up after the read (Redis runs a
        pipeline in order, even behind a blocking read). The finalizer sets a reason before it
        checks for pending lines, so a line read before an abort is pending when it looks (and
        it waits), and one read after it is seen here as aborted and never sent.
        """
        by_read: dict[tuple[int, int], list[str]] = {}
        for batch_id, count in plan.items():
            by_read.setdefault((keys.shard_of(batch_id), count), []).append(batch_id)
        # XREADGROUP takes one COUNT for all its streams, and on a cluster streams of one slot: one
        # read per shard and count. Only a lone read over every running batch may block: a blocked
        # read would hold up the others in the pipeline (on its node), and waiting on some streams
        # while others have lines would idle the worker.
        block = BLOCK_MS if len(by_read) == 1 and len(plan) >= len(self.candidates) else None
        pipe = self.redis.pipeline(transaction=False)
        for (_, count), batch_ids in by_read.items():
            pipe.xreadgroup(
                keys.WORKER_GROUP, self.name, {keys.lines(b): ">" for b in batch_ids}, count=count, block=block
            )
        batch_ids = list(plan)
        for batch_id in batch_ids:
            pipe.hget(keys.batch(batch_id), BatchField.ABORT)
        replies = await pipe.execute(raise_on_error=False)
        reads, reasons = replies[: len(by_read)], replies[len(by_read) :]
        lines: list[Line] = []
        got: dict[str, int] = {}
        for reply in reads:
            if isinstance(reply, ResponseError):
                # NOGROUP / UNBLOCKED: a batch ended and its stream went away; the next read refreshes.
                self.log.debug("read_skipped", error=str(reply))
                continue
            if isinstance(reply, Exception):
                raise reply
            for stream, entries in reply or []:
                batch_id = keys.batch_id_of(stream.decode())
                got[batch_id] = got.get(batch_id, 0) + len(entries)
                lines += [self._line(batch_id, entry_id, fields) for entry_id, fields in entries]
        self.scheduler.charge(got, self.candidates, asyncio.get_running_loop().time())
        return lines, {b: r.decode() for b, r in zip(batch_ids, reasons) if isinstance(r, bytes)}, block is not None

    async def _aborts(self, batch_ids: set[str]) -> dict[str, str]:
        """The abort reason of each of these batches that has one."""
        ordered = sorted(batch_ids)
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ordered:
            pipe.hget(keys.batch(batch_id), BatchField.ABORT)
        return {b: r.decode() for b, r in zip(ordered, await pipe.execute()) if r}

    async def _reclaim(self, batch_ids: list[str], free: int) -> list[Line]:
        """Take over lines a dead worker left pending longer than a lease (a live one renews)."""
        loop_now = asyncio.get_running_loop().time()
        if loop_now < self.next_reclaim:
            return []
        self.next_reclaim = loop_now + self.settings.lease_s / 4
        lease_ms = int(self.settings.lease_s * 1000)
        lines: list[Line] = []
        for batch_id in batch_ids:
            stream = keys.lines(batch_id)
            try:
                reply = await self.redis.xautoclaim(
                    stream,
                    keys.WORKER_GROUP,
                    self.name,
                    lease_ms,
                    start_id=self.claim_cursors.get(batch_id, "0-0"),
                    count=free,
                )
            except ResponseError:
                continue
            # The cursor must survive between calls, or entries past the first page are never seen.
            cursor, entries = reply[0], reply[1]
            self.claim_cursors[batch_id] = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            claimed = [self._line(batch_id, entry_id, fields) for entry_id, fields in entries if fields]
            if claimed:
                self.log.warning("lines_reclaimed", batch_id=batch_id, lines=len(claimed))
                lines += await self._drop_poison(batch_id, claimed)
            free -= len(claimed)
            if free <= 0:
                break
        return lines

    async def _drop_poison(self, batch_id: str, lines: list[Line]) -> list[Line]:
        """Record lines delivered too often (they keep killing workers) as errors; return the rest."""
        details = await self.redis.xpending_range(
            keys.lines(batch_id),
            keys.WORKER_GROUP,
            min=lines[0].entry_id,
            max=lines[-1].entry_id,
            count=len(lines) * 2,
            consumername=self.name,
        )
        deliveries = {d["message_id"].decode(): d["times_delivered"] for d in details}
        limit = self.settings.max_deliveries
        poison = [line for line in lines if deliveries.get(line.entry_id, 0) > limit]
        if poison:
            self.log.error("poison_lines", batch_id=batch_id, custom_ids=[line.custom_id for line in poison])
            message = (
                f"This request was delivered {limit} times and every worker handling it stopped; it was not retried."
            )
            await store.record_results(
                self.redis,
                batch_id,
                [
                    (line.index, line.entry_id, Outcome.FAILED, error_line(line.custom_id, POISON_CODE, message))
                    for line in poison
                ],
            )
        return [line for line in lines if line not in poison]

    @staticmethod
    def _line(batch_id: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Line:
        entry = entry_id.decode()
        queued = fields.get(streams.LINE_QUEUED_NS)
        return Line(
            batch_id,
            entry,
            int(entry.split("-")[1]) - 1,
            fields[streams.LINE_CUSTOM_ID].decode(),
            fields[streams.LINE_BODY],
            fields[streams.LINE_PROVIDER].decode(),
            int(fields[streams.LINE_COST]),
            int(queued) if queued else 0,
        )

    async def _dispatch(self, lines: list[Line], aborts: dict[str, str]) -> None:
        """Record the lines of aborting batches as such, unsent; start a task for every other line."""
        for batch_id, reason in aborts.items():
            skipped = [line for line in lines if line.batch_id == batch_id]
            if skipped:
                await store.record_results(
                    self.redis,
                    batch_id,
                    [
                        (line.index, line.entry_id, Outcome.FAILED, abort_line(line.custom_id, reason))
                        for line in skipped
                    ],
                )
        for line in lines:
            if line.batch_id not in aborts:
                task = asyncio.create_task(self._process(line))
                self.inflight[task] = line
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task)
        self.freed.set()

    async def _process(self, line: Line) -> None:
        bound = self.log.bind(batch_id=line.batch_id, custom_id=line.custom_id, provider=line.provider)
        info = self.batches.get(line.batch_id)
        if info is None:
            return  # the batch is gone; nothing left to record into
        provider = self.settings.provider(line.provider)
        traced = self._trace(line, info) if info.traceparent else None
        # Attempts count under configured providers only: a line's provider field may name none.
        attempts = Attempts(provider.name if provider else "", timed=traced is not None)
        called = time.time_ns() if traced else 0
        try:
            result = await self._outcome(line, info, bound, attempts)
        except asyncio.CancelledError:
            if traced:
                traced.abandoned("cancelled")
            raise
        if traced:
            traced.upstream(attempts.provider, called, attempts)
        recording = time.time_ns() if traced else 0
        try:
            await self.recorder.record(
                line.batch_id,
                (
                    line.index,
                    line.entry_id,
                    result.outcome,
                    result.line,
                    result.usage,
                    *attempts.encode(result.outcome),
                ),
            )
        except Exception:
            # Left pending: the line is delivered again after its lease.
            bound.exception("record_failed")
            if traced:
                traced.abandoned("record_failed")
            return
        except asyncio.CancelledError:
            if traced:
                traced.abandoned("cancelled")
            raise
        if traced:
            traced.recorded(recording, result.outcome)
        bound.debug("line_done", outcome=result.outcome, attempts=result.attempts)

    def _trace(self, line: Line, info: BatchInfo) -> tracing.LineTrace | None:
        """This line's spans when it is sampled; the batch's trace id in this task's log lines either way."""
        if not tracing.enabled():
            return None
        traced = tracing.line_trace(
            info.traceparent,
            batch_id=line.batch_id,
            index=line.index,
            custom_id=line.custom_id,
            queued_ns=line.queued_ns,
        )
        # Each line runs in a task of its own: these context variables are the line's alone.
        structlog.contextvars.bind_contextvars(
            **(traced.log_ids if traced else {"trace_id": tracing.trace_id_of(info.traceparent)})
        )
        return traced

    async def _outcome(
        self,
        line: Line,
        info: BatchInfo,
        bound: structlog.BoundLogger,
        attempts: Attempts,
    ) -> CallResult:
        """The provider's answer, retries included; an internal error becomes a failed result."""
        while True:
            try:
                return await self._call(line, info, bound, attempts)
            except REDIS_DOWN as e:
                # Only waiting for a provider slot touches Redis before the call: safe to redo.
                await asyncio.sleep(self.outage.failed(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # A bug must end the line visibly, not leave it to be redelivered into the same bug.
                bound.exception("line_failed")
                return CallResult(
                    Outcome.FAILED,
                    error_line(
                        line.custom_id,
                        "internal_error",
                        f"Sluice failed while handling this request: {type(e).__name__}",
                    ),
                    0,
                )

    async def _call(self, line: Line, info: BatchInfo, log: FilteringBoundLogger, attempts: Attempts) -> CallResult:
        provider = self.settings.provider(line.provider)
        if provider is None:
            return CallResult(
                Outcome.FAILED,
                error_line(
                    line.custom_id, "provider_not_configured", f"This worker has no provider named '{line.provider}'."
                ),
                0,
            )
        api_key = unseal(self.settings.secret_key, info.sealed_key) if info.sealed_key else provider.api_key
        return await self.upstream.call(
            provider,
            info.endpoint,
            line.custom_id,
            line.body,
            api_key=api_key,
            holder=line.holder,
            cost=line.cost,
            log=log,
            attempts=attempts,
        )

    # ------------------------------------------------------------------ leases and shutdown
    async def _renew_leases(self) -> None:
        interval = self.settings.lease_s / 4
        while True:
            await asyncio.sleep(interval)
            lines = list(self.inflight.values())
            await self._set_idle(lines, 0)
            by_provider: dict[str, list[str]] = {}
            for line in lines:
                by_provider.setdefault(line.provider, []).append(line.holder)
            for provider, holders in by_provider.items():
                try:
                    await self.limiter.renew(provider, holders)
                except Exception as e:
                    self.log.warning("lease_renewal_failed", provider=provider, error=str(e))

    async def _set_idle(self, lines: list[Line], idle_ms: int) -> None:
        """Set how long the group believes these lines idle: 0 renews a lease, past it hands them back.

        Only lines this worker still owns: one reclaimed by a peer while this worker was paused
        stays the peer's.
        """
        by_batch: dict[str, list[str]] = {}
        for line in lines:
            by_batch.setdefault(line.batch_id, []).append(line.entry_id)
        for batch_id, entry_ids in by_batch.items():
            try:
                # JUSTID leaves the delivery counter alone: it must count crashes, not renewals.
                kept = await _SET_IDLE(
                    self.redis,
                    stream=keys.lines(batch_id),
                    group=keys.WORKER_GROUP,
                    consumer=self.name,
                    idle_ms=idle_ms,
                    entry_ids=entry_ids,
                )
            except Exception as e:
                self.log.warning("lease_update_failed", batch_id=batch_id, idle_ms=idle_ms, error=str(e))
                continue
            if kept < len(entry_ids):
                # Reclaimed by a peer (or recorded) while this worker was paused: its result, if it
                # gets one here too, changes nothing.
                self.log.info("lines_taken_over", batch_id=batch_id, lines=len(entry_ids) - kept)

    async def _drain(self) -> None:
        if not self.inflight:
            return
        grace = self.settings.shutdown_grace_s
        self.log.info("draining", in_flight=len(self.inflight), grace_s=grace)
        done, pending = await asyncio.wait(list(self.inflight), timeout=grace)
        unfinished = [self.inflight[task] for task in pending if task in self.inflight]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # Results already answered are still being written: handing their lines back would send them again.
        await self.recorder.settle(timeout=RECORD_SETTLE_S)
        if unfinished:
            await self._hand_back(unfinished)

    async def _hand_back(self, lines: list[Line]) -> None:
        """Mark unfinished lines as idle past their lease, so live workers reclaim them at once."""
        await self._set_idle(lines, int(self.settings.lease_s * 1000) + 1)
        self.log.warning("left_unfinished", lines=len(lines))


def run(settings: Settings) -> None:
    """``sluice worker``: run one worker process until SIGTERM/SIGINT."""
    run_until_signal("worker", settings, lambda: Worker(settings))
