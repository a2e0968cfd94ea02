"""The finalizer: drains recorded results into output/error files and ends batches.

Finalizers scale out like workers: each live batch has a lease of its own (``keys.finalizer``),
and every finalizer holds the leases of up to a fair share of the live batches (their number
divided by the finalizers at work, rounded up), taking free ones each tick and giving up any
beyond its share, so that N finalizers finalize different batches at once and a finalizer that
dies or stalls delays only the batches it held (until their leases expire). A background task
renews the leases held. Every Redis write made for a batch is fenced by its lease
(``service/core/leases.py``): a finalizer paused past its lease and resumed has its writes
refused (``fenced_write_refused``) and lets the batch go.

Each tick, for every batch it holds:

1. An ``in_progress`` batch past ``expires_at`` is marked to abort with ``batch_expired``.
2. An aborting batch (cancelled or expired) whose in-flight lines have finished gets a
   ``batch_cancelled``/``batch_expired`` error result for every line without a result.
3. New results are appended to the batch's output and error files: read together with the
   recorded offsets in one fenced step, appended at those offsets, then the new offsets are
   recorded (and the drained results trimmed) in another. A file's bytes are a function of the
   results stream, so whoever writes a range writes the same bytes: a finalizer killed mid-write
   redoes the same append (no line twice, none missing), and a stale one rewriting a range it
   read before its lease ran out changes nothing (``Storage.append``).
4. Once every line has a result, the files are registered and the batch reaches its terminal
   state (``completed``, ``cancelled`` or ``expired``), its work keys deleted in the same step.

Chores that must run once at a time take a lease of their own, one per shard, in the slot of the
shard's sets they cover (``keys.housekeeping``): the expired-file sweep (every
``SLUICE_SWEEP_INTERVAL_S``, each shard whose lease is free, with the usage audit, which has a lease
of its own) and the completion webhooks (service/core/webhooks.py), sent by whichever finalizers
hold the shards' "webhooks" leases (each holds up to a fair share of the shards, as with batches),
in a task of its own so they never hold finalization up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TypeVar

import msgspec
import structlog
from redis.exceptions import ResponseError

from service.core import counters, keys, leases, shards, store, streams, tracing
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage, Script, connect
from service.core.heartbeat import Heartbeat, Tally
from service.core.leases import FencedScript, Lease, LeaseLost
from service.core.lifecycle import process_name, run_until_signal
from service.core.loop import run_loop
from service.core.records import BatchField, BatchRecord
from service.core.results import abort_line, result_filename
from service.core.storage import Storage, open_storage
from service.core.store import Outcome
from service.core.validation import check_line, iter_lines
from service.core.webhooks import WebhookSender
from service.core.wire import TERMINAL_STATUSES

from .delegate import Delegator

log = structlog.get_logger("sluice.finalizer")

TICK_S = 0.2
# How often a finalizer below its share of the shards' webhook leases looks for free ones.
CHORE_CHECK_S = 1.0
DRAIN_COUNT = 2000
ABORT_CHUNK = 500
OUTPUT_TTL_S = 30 * 24 * 3600

_F = BatchField
# What a lease taken by Finalizer._take_free stands for: a batch id, a shard.
_K = TypeVar("_K")
# The order _DRAIN_READ reads them in.
_DRAIN_FIELDS = (_F.FIN_CURSOR, _F.FIN_OUT_BYTES, _F.FIN_ERR_BYTES, _F.FIN_OUT_LINES, _F.FIN_ERR_LINES)
_COMPLETED = Outcome.COMPLETED.encode()

# What has been drained so far and the results after it, read in one step while the lease is held: the offsets always match the results.
_DRAIN_READ = FencedScript(
    keys=("batch", "results"),
    args=("count",),
    source="""
local drained = redis.call('HMGET', KEYS.batch, 'fin_cursor', 'fin_out_bytes', 'fin_err_bytes', 'fin_out_lines',
                           'fin_err_lines')
local cursor = drained[1] or '0-0'
return {drained, redis.call('XRANGE', KEYS.results, '(' .. cursor, '+', 'COUNT', ARGV.count)}
""",
)

# keep_from is the first id to keep, fields the drain fields and values. Records a drain step once:
# a re-sent call finds its own cursor and changes nothing.
_DRAIN_COMMIT = FencedScript(
    keys=("batch", "results"),
    args=("cursor_from", "cursor_to", "keep_from", "*fields"),
    source="""
local cursor = redis.call('HGET', KEYS.batch, 'fin_cursor') or '0-0'
if cursor ~= ARGV.cursor_from then
  if cursor == ARGV.cursor_to then return 0 end
  return redis.error_reply('FENCED drain of ' .. KEYS.batch .. ' is at ' .. cursor .. ', not ' .. ARGV.cursor_from)
end
redis.call('HSET', KEYS.batch, unpack(ARGV, 4, #ARGV))
redis.call('XTRIM', KEYS.results, 'MINID', ARGV.keep_from)
return 1
""",
)

# window_ms: how long a finalizer counts after its last check-in. Returns how many finalizers are
# at work (this one included), by Redis's clock.
_CHECK_IN = Script(
    keys=("finalizers",),
    args=("name", "window_ms"),
    source="""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS.finalizers, now, ARGV.name)
redis.call('ZREMRANGEBYSCORE', KEYS.finalizers, '-inf', now - tonumber(ARGV.window_ms))
redis.call('PEXPIRE', KEYS.finalizers, 10 * tonumber(ARGV.window_ms))
return redis.call('ZCARD', KEYS.finalizers)
""",
)


def _bit(bitmap: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> (index & 7)))


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _text(value: bytes | str | bool | None, default: str = "") -> str:
    # A script's Lua false arrives as False over RESP3 (redis-py 8's default), as None over RESP2.
    if value is None or value is False:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


class Finalizer:
    """The finalizer process's state."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.name = process_name()
        self.stop = asyncio.Event()
        # Short enough that a peer takes over soon after a crash or a stall, long enough to ride
        # out a Redis failover.
        self.lease_ms = int(min(10.0, settings.lease_s) * 1000)
        self.held: dict[str, Lease] = {}  # batch id -> its lease
        self.chores: dict[tuple[str, int], Lease] = {}  # ("sweep"/"webhooks", shard) -> its lease
        self.next_chore_check = 0.0
        self.finalizers = 1
        self.next_sweep = 0.0
        self.audit: asyncio.Task[None] | None = None
        self.tally = Tally()
        self.ticked_at = time.monotonic()  # end of the last complete tick
        self.live = 0

    def _beat_fields(self) -> dict[str, str | int | float]:
        """What the finalizer's heartbeat says (see ``service.heartbeat``)."""
        return {
            "state": "stopping" if self.stop.is_set() else "running",
            "leased_batches": len(self.held),
            "live_batches": self.live,
            "since_tick_s": round(time.monotonic() - self.ticked_at, 3),
        }

    async def run(self) -> None:
        """Tick until ``stop`` is set, then give every lease up so peers take over at once."""
        self.redis = connect(self.settings, max_connections=8)
        log.info("finalizer_started", name=self.name)
        outage = Outage(log)
        heartbeat = Heartbeat(self.redis, self.name, "finalizer", tally=self.tally, fields=self._beat_fields)
        heartbeat.start()
        self.webhooks = WebhookSender(self.redis, self.settings)
        keeper = asyncio.create_task(self._keep_leases(), name="lease-keeper")
        delegator = Delegator(self.settings, self.storage, self.name)  # every finalizer takes part
        delegator.start()
        try:
            await run_loop(self.step, stop=self.stop, outage=outage, log=log, error_event="finalizer_error")
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if self.audit is not None:
                self.audit.cancel()
                await asyncio.gather(self.audit, return_exceptions=True)
            await delegator.aclose()
            await self.webhooks.aclose()
            with contextlib.suppress(*REDIS_DOWN):
                for lease in [*self.held.values(), *self.chores.values()]:
                    await leases.drop(self.redis, lease)
                await self.redis.zrem(keys.FINALIZERS, self.name)
            self.held.clear()
            self.chores.clear()
            await heartbeat.close()
            await self.redis.aclose()
            await self.storage.aclose()
        log.info("finalizer_stopped")

    # ------------------------------------------------------------------ leases
    async def _check_in(self) -> None:
        self.finalizers = max(
            1, int(await _CHECK_IN(self.redis, finalizers=keys.FINALIZERS, name=self.name, window_ms=self.lease_ms))
        )

    async def _keep_leases(self) -> None:
        """Renew every lease held, often enough that a slow step never loses one."""
        while True:
            await asyncio.sleep(self.lease_ms / 4000)
            try:
                await self._check_in()
                lost = await leases.renew_many(self.redis, [*self.held.values(), *self.chores.values()], self.lease_ms)
            except REDIS_DOWN:
                continue  # the tick notices the outage; the leases may expire meanwhile, which is safe
            for lease in lost:
                self._let_go(lease, "lease_lost")

    def _let_go(self, lease: Lease, event: str | None = None, **details: object) -> None:
        """Forget ``lease`` (unless it was already replaced); log ``event`` if given.

        ``lease_lost``: a renewal found it expired or taken over. ``fenced_write_refused``: a
        write made for it was refused; whatever that step was doing is dropped.
        """
        forgotten = False
        for batch_id, held in list(self.held.items()):
            if held == lease:
                del self.held[batch_id]
                forgotten = True
        for chore, held in list(self.chores.items()):
            if held == lease:
                del self.chores[chore]
                forgotten = True
        if event and (forgotten or event == "fenced_write_refused"):
            log.warning(event, lease=lease.key, token=lease.token, **details)

    async def _share(self, live: list[str]) -> None:
        """Hold the leases of a fair share of the live batches: take free ones, give up extra ones."""
        still_live = set(live)
        for batch_id in [b for b in self.held if b not in still_live]:
            # It ended (its lease went with its work keys) or left the live set meanwhile.
            lease = self.held.pop(batch_id)
            await leases.drop(self.redis, lease)
        share = -(-len(live) // self.finalizers)
        if len(self.held) > share:
            for batch_id in sorted(self.held)[share:]:
                lease = self.held.pop(batch_id)
                await leases.drop(self.redis, lease)
                log.info("batch_lease_shed", batch_id=batch_id, share=share, finalizers=self.finalizers)
            return
        want = share - len(self.held)
        candidates = [b for b in live if b not in self.held]
        if want <= 0 or not candidates or self.stop.is_set():
            return
        for batch_id, taken in await self._take_free({b: keys.finalizer(b) for b in candidates}, want):
            self.held[batch_id] = taken
            log.info("batch_leased", batch_id=batch_id, token=taken.token)

    async def _take_free(self, candidates: dict[_K, str], want: int) -> list[tuple[_K, Lease]]:
        """Take up to ``want`` of the ``candidates`` leases (by what they stand for) that are free now."""
        holders = await shards.mget(self.redis, list(candidates.values()))
        free = [c for c, holder in zip(candidates, holders) if holder is None]
        random.shuffle(free)  # peers looking at the same free leases mostly pick different ones
        free = free[:want]
        taken = await leases.take_many(self.redis, [candidates[c] for c in free], self.name, self.lease_ms)
        return [(c, lease) for c, lease in zip(free, taken) if lease is not None]

    # ------------------------------------------------------------------ the tick
    async def step(self) -> float:
        """One pass (:meth:`tick`); how long to wait before the next."""
        await self.tick()
        self.ticked_at = time.monotonic()
        return TICK_S

    async def tick(self) -> None:
        """Share the live batches out, advance the ones held, run the chores due."""
        await self._check_in()
        live = await shards.members(self.redis, keys.live_batches)
        self.live = len(live)
        await self._share(live)
        for batch_id, lease in list(self.held.items()):
            if self.stop.is_set():
                break
            if self.held.get(batch_id) != lease:
                continue  # lost meanwhile
            try:
                await self.advance(batch_id, lease)
            except LeaseLost as e:
                self._let_go(lease, "fenced_write_refused", batch_id=batch_id, error=str(e))
            except REDIS_DOWN:
                raise
            except Exception:
                log.exception("finalize_failed", batch_id=batch_id)
        await self._chores()

    async def _chores(self) -> None:
        if self.stop.is_set():
            return
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + self.settings.sweep_interval_s
            if self.audit is None or self.audit.done():  # it takes its own lease (store.audit_usage)
                self.audit = asyncio.create_task(self._audit_usage(), name="usage-audit")
            await self._sweep()
        await self._share_webhooks()
        held = {shard: lease for (chore, shard), lease in self.chores.items() if chore == "webhooks"}
        if held:
            self.webhooks.start_pass(held)  # in a task of its own: never holds finalization up

    async def _sweep(self) -> None:
        """Sweep the expired files of every shard whose "sweep" lease is free (a peer sweeps the others)."""
        order = list(range(keys.SHARDS))
        random.shuffle(order)  # peers sweeping at the same time mostly split the shards between them
        taken = await leases.take_many(
            self.redis, [keys.housekeeping("sweep", shard) for shard in order], self.name, self.lease_ms
        )
        mine = [(shard, lease) for shard, lease in zip(order, taken) if lease is not None]
        for shard, lease in mine:
            self.chores["sweep", shard] = lease
        swept = 0
        try:
            for shard, lease in mine:
                if self.stop.is_set() or self.chores.get(("sweep", shard)) != lease:
                    continue  # stopping, or lost meanwhile
                try:
                    swept += await store.sweep_expired_files(self.redis, self.storage, shard=shard, lease=lease)
                    # Releases and forgets whose process died between their steps (store.replay_outbox).
                    await store.replay_outbox(self.redis, shard)
                except LeaseLost as e:
                    self._let_go(lease, "fenced_write_refused", error=str(e))
        finally:
            for _, lease in mine:
                self._let_go(lease)
                await leases.drop(self.redis, lease)
        if swept:
            log.info("files_expired", files=swept)
        if mine:
            # Keep the history folded as it goes (idempotent, any number of finalizers at once), so the
            # first 24 h read after a quiet day does not fold the whole day (counters.fold_history).
            await counters.fold_history(self.redis, now=time.time(), since=time.time() - counters.HISTORY_TTL_S)

    async def _share_webhooks(self) -> None:
        """Hold the "webhooks" leases of a fair share of the shards: shed extra ones, take free ones."""
        held = sorted(shard for chore, shard in self.chores if chore == "webhooks")
        share = -(-keys.SHARDS // self.finalizers)
        # Shed between passes: a pass under way would have its writes for a shed shard refused.
        passing = self.webhooks.task is not None and not self.webhooks.task.done()
        for shard in held[share:] if not passing else []:
            lease = self.chores.pop(("webhooks", shard))
            await leases.drop(self.redis, lease)
            log.info("chore_shed", chore="webhooks", shard=shard, share=share)
        want = share - len(held)
        now = time.monotonic()
        if want <= 0 or now < self.next_chore_check:
            return
        self.next_chore_check = now + CHORE_CHECK_S
        free = {s: keys.housekeeping("webhooks", s) for s in range(keys.SHARDS) if s not in held}
        taken = await self._take_free(free, want)
        for shard, lease in taken:
            self.chores["webhooks", shard] = lease
        if taken:
            log.info("chore_taken", chore="webhooks", shards=sorted(shard for shard, _ in taken))

    async def _audit_usage(self) -> None:
        """Repair drifted usage counters (store.audit_usage), beside the ticks: it reads every owner."""
        try:
            await store.audit_usage(self.redis, self.storage, self.name)
        except REDIS_DOWN:
            pass  # the next sweep tries again
        except Exception:
            log.exception("usage_audit_failed")

    # ------------------------------------------------------------------ one batch
    async def advance(self, batch_id: str, lease: Lease) -> None:
        """Move one batch, whose lease is held, as far as it can go now."""
        h = await store.get_batch_record(self.redis, batch_id)
        if h is None or h.status in TERMINAL_STATUSES:
            await self._clean_up(batch_id, h, lease)
            return
        if h.status == "in_progress" and not h.abort and h.expires_at is not None and time.time() >= h.expires_at:
            await store.transition(
                self.redis,
                batch_id,
                allowed=["in_progress"],
                fields={_F.ABORT: "batch_expired"},
                remove_from=[keys.active_batches],
                lease=lease,
            )
            log.info("batch_expiring", batch_id=batch_id)
            h = await store.get_batch_record(self.redis, batch_id) or h
        # Lines on a provider's own Batch API are settled by workers/delegate.py first.
        delegating = h.deleg_open > 0
        if h.abort and not h.all_done and not delegating:
            await self._abort_remaining(h, lease)
        await self._drain(h, lease)
        if h.all_done and not delegating and h.fin_out_lines + h.fin_err_lines == h.total:
            await self._finish(h, lease)

    async def _clean_up(self, batch_id: str, h: BatchRecord | None, lease: Lease) -> None:
        """A batch that ended (or whose record is gone) but is still live: finish its clean-up."""
        if h is not None:
            await store.release(self.redis, self.storage, h, lease=lease)
        others = [k for k in keys.work_keys(batch_id) if k != lease.key]
        shard = keys.shard_of(batch_id)
        await leases.execute(
            self.redis,
            lease,
            ("DEL", *others),
            ("ZREM", keys.pending_validation(shard), batch_id),
            *(("SREM", s(shard), batch_id) for s in (keys.live_batches, keys.active_batches, keys.feeding_batches)),
        )
        self.held.pop(batch_id, None)
        await leases.drop(self.redis, lease)

    async def _abort_remaining(self, h: BatchRecord, lease: Lease) -> None:
        batch_id = h.id
        if not await self._in_flight_settled(batch_id):
            return
        reason = h.abort
        bitmap = await self.redis.get(keys.done(batch_id)) or b""
        pending: list[tuple[int, str, str, bytes]] = []
        index = -1
        async for line in iter_lines(self.storage, h.input_key):
            index += 1
            if _bit(bitmap, index):
                continue
            request = check_line(line, h.endpoint)
            custom_id = getattr(request, "custom_id", "")
            pending.append((index, "", Outcome.FAILED, abort_line(custom_id, reason)))
            if len(pending) >= ABORT_CHUNK:
                await store.record_results(self.redis, batch_id, pending, lease=lease)
                pending = []
        await store.record_results(self.redis, batch_id, pending, lease=lease)
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
            keys.lines(batch_id),
            keys.WORKER_GROUP,
            min="-",
            max="+",
            count=summary["pending"],
            idle=int(self.settings.lease_s * 1000),
        )
        return len(stale) == summary["pending"]

    async def _drain(self, h: BatchRecord, lease: Lease) -> None:
        """Append the results recorded since the last drain to the files; ``h`` follows the drain fields."""
        batch_id = h.id
        while True:
            drained, entries = await _DRAIN_READ(
                self.redis, batch=keys.batch(batch_id), results=keys.results(batch_id), count=DRAIN_COUNT, lease=lease
            )
            state = BatchRecord.from_values(_DRAIN_FIELDS, (_text(v).encode() or None for v in drained))
            h.fin_cursor, h.fin_out_bytes, h.fin_err_bytes = state.fin_cursor, state.fin_out_bytes, state.fin_err_bytes
            h.fin_out_lines, h.fin_err_lines = state.fin_out_lines, state.fin_err_lines
            if not entries:
                return
            cursor = state.fin_cursor or "0-0"
            offsets = {"out": state.fin_out_bytes, "err": state.fin_err_bytes}
            counts = {"out": state.fin_out_lines, "err": state.fin_err_lines}
            chunks: dict[str, list[bytes]] = {"out": [], "err": []}
            for _, flat in entries:
                fields = dict(zip(flat[::2], flat[1::2]))
                chunks["out" if fields[streams.RESULT_OUTCOME] == _COMPLETED else "err"].append(
                    fields[streams.RESULT_LINE]
                )
            for name, lines in chunks.items():
                if lines:
                    data = b"\n".join(lines) + b"\n"
                    offsets[name] = await self.storage.append(
                        self._spool_key(batch_id, name), data, offsets[name], token=lease.token
                    )
                    counts[name] += len(lines)
            last = _text(entries[-1][0])
            update: dict[str, str | int] = {
                _F.FIN_CURSOR: last,
                _F.FIN_OUT_BYTES: offsets["out"],
                _F.FIN_ERR_BYTES: offsets["err"],
                _F.FIN_OUT_LINES: counts["out"],
                _F.FIN_ERR_LINES: counts["err"],
            }
            await _DRAIN_COMMIT(
                self.redis,
                batch=keys.batch(batch_id),
                results=keys.results(batch_id),
                cursor_from=cursor,
                cursor_to=last,
                keep_from=_next_id(last),
                fields=update,
                lease=lease,
            )
            h.fin_cursor, h.fin_out_bytes, h.fin_err_bytes = last, offsets["out"], offsets["err"]
            h.fin_out_lines, h.fin_err_lines = counts["out"], counts["err"]

    @staticmethod
    def _spool_key(batch_id: str, name: str) -> str:
        return result_filename(batch_id, "output" if name == "out" else "error")

    async def _finish(self, h: BatchRecord, lease: Lease) -> None:
        batch_id = h.id
        now = store.now()
        finishing_since = time.time_ns()
        if h.status == "in_progress" and not h.abort:
            applied, _ = await store.transition(
                self.redis,
                batch_id,
                allowed=["in_progress"],
                fields={_F.STATUS: "finalizing", _F.FINALIZING_AT: now},
                lease=lease,
            )
            if not applied:
                return  # cancelled at the last moment: the next tick finishes it as cancelled
            h.status = "finalizing"
        if h.status == "finalizing":
            final, stamp, allowed = "completed", _F.COMPLETED_AT, ["finalizing"]
        elif h.status == "cancelling":
            final, stamp, allowed = "cancelled", _F.CANCELLED_AT, ["cancelling"]
        else:
            final, stamp, allowed = "expired", _F.EXPIRED_AT, ["in_progress"]
        file_ids = {name: await self._register_file(h, name, lease) for name in ("out", "err")}
        # Before the batch ends, so that the end is the last step: a crash before it redoes all
        # this (each step is idempotent), a crash after it leaves nothing to do.
        await store.release(self.redis, self.storage, h, lease=lease)
        applied, _ = await store.transition(
            self.redis,
            batch_id,
            allowed=allowed,
            fields={
                _F.STATUS: final,
                stamp: now,
                _F.OUTPUT_FILE_ID: file_ids["out"] or "",
                _F.ERROR_FILE_ID: file_ids["err"] or "",
            },
            remove_from=[keys.live_batches, keys.active_batches, keys.feeding_batches],
            delete=[k for k in keys.work_keys(batch_id) if k != lease.key],
            expire_s=self.settings.retention_s,
            lease=lease,
        )
        if not applied:
            return
        tracing.batch_finished(h, final, finishing_since)
        await leases.execute(self.redis, lease, ("ZREM", keys.pending_validation(keys.shard_of(batch_id)), batch_id))
        self.held.pop(batch_id, None)
        await leases.drop(self.redis, lease)
        log.info(
            "batch_finished",
            batch_id=batch_id,
            status=final,
            completed=str(h.completed),
            failed=str(h.failed),
            total=str(h.total),
            **tracing.log_fields(h),
        )

    async def _register_file(self, h: BatchRecord, name: str, lease: Lease) -> str | None:
        """Create the output or error file record; the same id on every retry (exactly once)."""
        try:
            return await self._register_file_once(h, name, lease)
        except store.Aborted:
            # The usage audit gave this id's charge back: no finalizer recorded it for
            # store.PENDING_STALE_S (a stale holder's charge, see store.create_file). Draw another.
            if name == "out":
                field, h = _F.FIN_OUT_FILE, msgspec.structs.replace(h, fin_out_file="")
            else:
                field, h = _F.FIN_ERR_FILE, msgspec.structs.replace(h, fin_err_file="")
            await leases.execute(self.redis, lease, ("HDEL", keys.batch(h.id), field))
            return await self._register_file_once(h, name, lease)

    async def _register_file_once(self, h: BatchRecord, name: str, lease: Lease) -> str | None:
        if name == "out":
            lines, size, field, fixed = h.fin_out_lines, h.fin_out_bytes, _F.FIN_OUT_FILE, h.fin_out_file
        else:
            lines, size, field, fixed = h.fin_err_lines, h.fin_err_bytes, _F.FIN_ERR_FILE, h.fin_err_file
        if lines == 0:
            return None
        if not fixed:
            # A stale finalizer drawing a number here only wastes it: the id is fixed below, fenced.
            fresh_id, fresh_seq = await store.new_id(self.redis, "file-", shard=keys.shard_of(h.id))
            _, value = await leases.execute(
                self.redis,
                lease,
                ("HSETNX", keys.batch(h.id), field, f"{fresh_id}:{fresh_seq}"),
                ("HGET", keys.batch(h.id), field),
            )
            fixed = _text(value)
        file_id, seq = fixed.split(":")
        created = store.now()
        ttl = h.output_expires_after or OUTPUT_TTL_S
        await store.create_file(
            self.redis,
            owner=h.owner,
            file_id=file_id,
            seq=int(seq),
            filename=self._spool_key(h.id, name),
            purpose="batch_output",
            size=size,
            storage_key=self._spool_key(h.id, name),
            expires_at=created + ttl,
            created_at=created,
            lease=lease,
        )
        return file_id


def run(settings: Settings) -> None:
    """``sluice finalizer``: run one finalizer process (any number may run) until SIGTERM/SIGINT."""
    run_until_signal("finalizer", settings, lambda: Finalizer(settings, open_storage(settings)))
