"""File and batch metadata in Redis, and the atomic scripts that move batches between states.

Metadata lives in Redis hashes so that every process (web, workers, finalizer, on any host)
sees the same state; file *contents* live in ``storage``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Callable, Iterable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from . import counters, keys
from .connections import Script
from .wire import Batch, BatchError, BatchErrors, FileObject, RequestCounts

Redis = aioredis.Redis

# Ids embed the creation sequence so that a deleted id still works as a list cursor.
_ID = re.compile(r"^(file-|batch_)([0-9a-f]{12})([0-9a-f]{12})$")

_TIMESTAMPS = (
    "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at",
)


def now() -> int:
    """Unix time in whole seconds, as every ``*_at`` field carries it."""
    return int(time.time())


def owner_of(token: str) -> str:
    """The owner id for an API token: a hash, so tokens are never stored."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def new_id(r: Redis, prefix: str) -> tuple[str, int]:
    """A fresh ``file-``/``batch_`` id and its sequence number."""
    seq = await r.incr(keys.SEQ)
    return f"{prefix}{seq:012x}{secrets.token_hex(6)}", seq


def seq_of(object_id: str) -> int | None:
    """The sequence number inside an id Sluice generated, or None for anything else."""
    m = _ID.match(object_id)
    return int(m.group(2), 16) if m else None


def valid_id(object_id: str, prefix: str) -> bool:
    """True when ``object_id`` has the shape of a Sluice id with ``prefix``."""
    m = _ID.match(object_id)
    return bool(m) and m.group(1) == prefix


def _str(h: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


# ----------------------------------------------------------------------------- files
async def create_file(
    r: Redis, *, owner: str, file_id: str, seq: int, filename: str, purpose: str,
    size: int, storage_key: str, expires_at: int | None, created_at: int | None = None, lines: int = 0,
    charge: bool = False,
) -> FileObject:
    """Record a stored file's metadata and index it for its owner.

    ``charge`` counts its size in the owner's stored bytes, once however often this is
    repeated (uploads reserve their bytes before they are recorded, result files do not).
    """
    created = created_at or now()
    record = {
        "id": file_id, "owner": owner, "bytes": size, "created_at": created, "filename": filename,
        "purpose": purpose, "storage_key": storage_key, "expires_at": expires_at or "", "lines": lines,
    }
    p = r.pipeline(transaction=True)
    p.hset(keys.file(file_id), mapping=record)
    p.zadd(keys.owner_files(owner), {file_id: seq})
    p.zadd(keys.owner_files(owner, purpose), {file_id: seq})
    if expires_at:
        p.expireat(keys.file(file_id), expires_at)
        p.zadd(keys.FILE_EXPIRY, {expiry_member(file_id, storage_key, owner, size): expires_at})
    if charge:
        p.eval(_CHARGE_ONCE, 2, keys.file(file_id), keys.owner_usage(owner), size)
    await p.execute()
    return file_from_record(_str({k.encode(): str(v).encode() for k, v in record.items()}))


def file_from_record(h: dict[str, str]) -> FileObject:
    """The wire object for a file's metadata hash."""
    return FileObject(
        id=h["id"], bytes=int(h["bytes"]), created_at=int(h["created_at"]), filename=h["filename"],
        purpose=h["purpose"], expires_at=int(h["expires_at"]) if h.get("expires_at") else None,
    )


async def get_file_record(r: Redis, owner: str, file_id: str) -> dict[str, str] | None:
    """The metadata hash of ``file_id`` if ``owner`` may see it."""
    if not valid_id(file_id, "file-"):
        return None
    h = _str(await r.hgetall(keys.file(file_id)))
    if not h or h.get("owner") != owner:
        return None
    return h


_CHARGE_ONCE = """
if redis.call('HSETNX', KEYS[1], 'charged', '1') == 1 then redis.call('HINCRBY', KEYS[2], 'stored_bytes', ARGV[1]) end
"""


def expiry_member(file_id: str, storage_key: str, owner: str, size: int | str) -> str:
    """The entry of a file in ``keys.FILE_EXPIRY``: enough to remove it after its record expired."""
    return f"{file_id} {storage_key} {owner} {size}"


async def delete_file_record(r: Redis, h: dict[str, str]) -> bool:
    """Forget a file's metadata; return True when its content is no longer needed by any batch."""
    p = r.pipeline(transaction=True)
    p.delete(keys.file(h["id"]))
    p.zrem(keys.FILE_EXPIRY, expiry_member(h["id"], h["storage_key"], h["owner"], h["bytes"]))
    p.hincrby(keys.owner_usage(h["owner"]), "stored_bytes", -int(h["bytes"]))
    p.zrem(keys.owner_files(h["owner"]), h["id"])
    p.zrem(keys.owner_files(h["owner"], h["purpose"]), h["id"])
    p.scard(keys.file_refs(h["id"]))
    *_, refs = await p.execute()
    return refs == 0


async def page(
    r: Redis, zkey: str, record_key: Callable[[str], str], *, after: str | None, limit: int, desc: bool,
) -> tuple[list[dict[str, str]], bool]:
    """One page of records from an owner index, after the cursor id, and whether more follow.

    Ids whose record has expired are pruned from the index on the way, so a page is never
    short while more records follow (the SDK stops paging at the first empty page).
    """
    if after is None:
        lo, hi = "-inf", "+inf"
    else:
        seq = seq_of(after)
        lo, hi = (f"({seq}", "+inf") if not desc else ("-inf", f"({seq}")
    while True:
        if desc:
            raw_ids = await r.zrevrangebyscore(zkey, hi, lo, start=0, num=limit + 1)
        else:
            raw_ids = await r.zrangebyscore(zkey, lo, hi, start=0, num=limit + 1)
        ids = [i.decode() for i in raw_ids]
        pipe = r.pipeline(transaction=False)
        for object_id in ids[:limit]:
            pipe.hgetall(record_key(object_id))
        records = await pipe.execute()
        gone = [object_id for object_id, h in zip(ids, records) if not h]
        if not gone:
            return [_str(h) for h in records], len(ids) > limit
        await r.zrem(zkey, *gone)


# ----------------------------------------------------------------------------- batches
async def create_batch(
    r: Redis, *, owner: str, batch_id: str, seq: int, endpoint: str, input_file_id: str,
    input_key: str, completion_window: str, window_s: int, metadata: dict[str, str] | None,
    output_expires_after: int | None, provider: str = "", sealed_key: str = "", reserved_lines: int = 0,
    webhook_url: str = "", trace: dict[str, str] | None = None,
) -> dict[str, str]:
    """Record a new batch in ``validating`` and queue it for validation.

    ``trace``: the batch's trace fields (``tracing.new_batch_fields``), when tracing is on.
    """
    created = now()
    record = {
        "id": batch_id, "owner": owner, "endpoint": endpoint, "input_file_id": input_file_id,
        "input_key": input_key, "completion_window": completion_window, "status": "validating", "created_at": created,
        "expires_at": created + window_s, "total": 0, "completed": 0, "failed": 0,
        "metadata": msgspec.json.encode(metadata).decode() if metadata is not None else "",
        "output_expires_after": output_expires_after or "", "provider": provider, "reserved_lines": reserved_lines,
        **(trace or {}),
    }
    p = r.pipeline(transaction=True)
    p.hset(keys.batch(batch_id), mapping=record)
    if sealed_key:
        p.hset(keys.batch(batch_id), "byok", sealed_key)
    if webhook_url:
        p.hset(keys.batch(batch_id), "webhook_url", webhook_url)
    p.zadd(keys.owner_batches(owner), {batch_id: seq})
    p.sadd(keys.file_refs(input_file_id), batch_id)
    p.zadd(keys.PENDING_VALIDATION, {batch_id: 0})
    await p.execute()
    return {k: str(v) for k, v in record.items()}


async def get_batch_record(r: Redis, batch_id: str) -> dict[str, str] | None:
    """The state hash of a batch, or None."""
    h = await r.hgetall(keys.batch(batch_id))
    return _str(h) if h else None


async def get_owned_batch(r: Redis, owner: str, batch_id: str) -> dict[str, str] | None:
    """The state hash of ``batch_id`` if ``owner`` may see it."""
    if not valid_id(batch_id, "batch_"):
        return None
    h = await get_batch_record(r, batch_id)
    if not h or h.get("owner") != owner:
        return None
    return h


def batch_from_record(h: dict[str, str]) -> Batch:
    """The wire object for a batch's state hash."""
    def ts(name: str) -> int | None:
        v = h.get(name)
        return int(v) if v else None

    errors = None
    if h.get("errors"):
        errors = BatchErrors(data=msgspec.json.decode(h["errors"], type=list[BatchError]))
    return Batch(
        id=h["id"], endpoint=h["endpoint"], input_file_id=h["input_file_id"],
        completion_window=h["completion_window"], status=h["status"],  # type: ignore[arg-type]
        created_at=int(h["created_at"]), model=h.get("model") or None, errors=errors,
        output_file_id=h.get("output_file_id") or None, error_file_id=h.get("error_file_id") or None,
        request_counts=RequestCounts(
            total=int(h.get("total") or 0), completed=int(h.get("completed") or 0),
            failed=int(h.get("failed") or 0),
        ),
        metadata=msgspec.json.decode(h["metadata"]) if h.get("metadata") else None,
        **{name: ts(name) for name in _TIMESTAMPS},
    )


# Move a batch to a new state only if it is in one of the allowed states; optionally add it to
# one set and remove it from others, all atomically.
_TRANSITION = Script("""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == st then allowed = true end
end
if not allowed then return {0, st} end
local n = tonumber(ARGV[5])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + n)) end
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  -- A terminal state: the client's provider key (BYOK) must not outlive the batch.
  redis.call('HDEL', KEYS[1], 'byok')
  -- ... and its completion webhook is due now (once: this branch runs for one transition only).
  if redis.call('HEXISTS', KEYS[1], 'webhook_url') == 1 then
    redis.call('ZADD', KEYS[#KEYS], 'NX', 0, ARGV[1])
  end
end
local adds = tonumber(ARGV[3])
for i = 2, 1 + adds do redis.call('SADD', KEYS[i], ARGV[1]) end
for i = 2 + adds, #KEYS - 1 do redis.call('SREM', KEYS[i], ARGV[1]) end
return {1, st}
""")


async def transition(
    r: Redis, batch_id: str, *, allowed: Iterable[str], fields: dict[str, str | int],
    add_to: Iterable[str] = (), remove_from: Iterable[str] = (), expire_s: int = 0,
) -> tuple[bool, str]:
    """Atomically apply ``fields`` if the batch's status is in ``allowed``.

    Returns (applied, status before); applied is also True when the batch already has the
    target status. ``add_to``/``remove_from`` are sets of batch ids
    (``keys.ACTIVE_BATCHES``, ``keys.LIVE_BATCHES``, ...) updated in the same step;
    ``expire_s`` > 0 gives the batch record its retention period (terminal states), and queues
    the batch's completion webhook, if it has one, in ``keys.WEBHOOKS_DUE``.
    """
    flat: list[str | int] = []
    for k, v in fields.items():
        flat += [k, v]
    add_to = list(add_to)
    script_keys = [keys.batch(batch_id), *add_to, *remove_from, keys.WEBHOOKS_DUE]
    applied, before = await _TRANSITION(
        r, script_keys, [batch_id, ",".join(allowed), len(add_to), expire_s, len(flat), *flat],
    )
    before = before.decode() if isinstance(before, bytes) else str(before)
    # Already in the target state: redis-py retried the script after a dropped connection (its
    # first run applied), or a peer got there first. Either way the transition has happened.
    if not applied and before and before == fields.get("status"):
        return True, before
    return bool(applied), before


# Record results for lines of one batch, at most once per line: the done bitmap guards against
# redelivery, the result goes to the results stream, the work entry is acknowledged and deleted,
# and the lines newly recorded move the batch's counters, the cluster counters and the current
# minute's history in the same step (service/core/counters.py), so no count is lost or doubled.
# KEYS: done, results, batch, lines, metrics lines, upstream, latency, history minute.
# ARGV: group, history TTL, then (index, entry_id, outcome, result, shape, micros) per line.
_RECORD = Script("""
local recorded = 0
local alive = redis.call('EXISTS', KEYS[2]) == 1
local shapes, sums = {}, {}
for i = 3, #ARGV, 6 do
  local entry = ARGV[i + 1]
  if entry ~= '' then
    redis.call('XACK', KEYS[4], ARGV[1], entry)
    redis.call('XDEL', KEYS[4], entry)
  end
  if alive and redis.call('SETBIT', KEYS[1], ARGV[i], 1) == 0 then
    redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', 'r', ARGV[i + 3], 'o', ARGV[i + 2])
    recorded = recorded + 1
    local shape = ARGV[i + 4]
    local s = sums[shape]
    if s then
      shapes[shape] = shapes[shape] + 1
    else
      s = {}
      sums[shape] = s
      shapes[shape] = 1
    end
    local us = ARGV[i + 5]
    if us ~= '' then
      local v = tonumber(us)
      if v then
        s[1] = (s[1] or 0) + v
      else
        local k = 0
        for x in string.gmatch(us, '%d+') do
          k = k + 1
          s[k] = (s[k] or 0) + tonumber(x)
        end
      end
    end
  end
end
if recorded == 0 then return 0 end
""" + counters.LUA_EXPAND + """
redis.call('EXPIRE', KEYS[8], ARGV[2])
return recorded
""")


class Outcome:
    """Which counter a result moves (and which file it lands in)."""

    COMPLETED = "completed"
    FAILED = "failed"


# A result to record: (index, entry_id, outcome, result_json), or the same followed by the line's
# (shape, micros) from ``counters.Attempts.encode`` when it was sent upstream.
Result = tuple


def _record_call(batch_id: str, results: Iterable[Result], minute: int) -> tuple[list[str], list]:
    argv: list[str | int | bytes] = [keys.WORKER_GROUP, counters.HISTORY_TTL_S]
    for result in results:
        if len(result) == 6:
            argv += result
        else:
            argv += [*result, *counters.unsent(result[2])]
    return [keys.done(batch_id), keys.results(batch_id), keys.batch(batch_id), keys.lines(batch_id),
            keys.METRICS_LINES, keys.METRICS_UPSTREAM, keys.METRICS_LATENCY, keys.history(minute)], argv


async def record_results(r: Redis, batch_id: str, results: Iterable[Result]) -> int:
    """Record ``(index, entry_id, outcome, result_json[, shape, micros])`` tuples; return how many were new.

    A line already recorded (a redelivery, or a race with cancellation) changes nothing; a
    batch whose work keys are gone (finished or deleted) records nothing. The lines recorded
    are counted in the cluster counters and the history in the same step.
    """
    ks, argv = _record_call(batch_id, results, counters.minute_of(time.time()))
    if len(argv) == 2:
        return 0
    return int(await _RECORD(r, ks, argv))


async def record_many(r: Redis, by_batch: dict[str, list[Result]]) -> None:
    """``record_results`` for several batches in one round trip."""
    minute = counters.minute_of(time.time())
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        for batch_id, results in by_batch.items():
            _RECORD.queue(pipe, *_record_call(batch_id, results, minute))
        try:
            await pipe.execute()
            return
        except NoScriptError:
            if attempt == 2:
                raise
            await _RECORD.load(r)  # Redis restarted and forgot its scripts; recording twice is harmless


async def release(r: Redis, storage, h: dict[str, str]) -> None:
    """A batch reached a terminal state: give back its quota and its claim on the input file.

    Safe to repeat. The content of an input file deleted while the batch ran is removed with
    the last claim.
    """
    await _RELEASE_BATCH(r, [keys.batch(h["id"]), keys.owner_usage(h["owner"])])
    p = r.pipeline(transaction=True)
    p.srem(keys.file_refs(h["input_file_id"]), h["id"])
    p.scard(keys.file_refs(h["input_file_id"]))
    p.exists(keys.file(h["input_file_id"]))
    _, refs, exists = await p.execute()
    if refs == 0 and not exists:
        await storage.delete(h["input_key"])


async def sweep_expired_files(r: Redis, storage, *, limit: int = 100) -> int:
    """Delete files whose ``expires_at`` has passed (content kept while a batch still reads it)."""
    now_s = now()
    swept = 0
    for member in await r.zrangebyscore(keys.FILE_EXPIRY, "-inf", now_s, start=0, num=limit):
        file_id, storage_key, owner, size = member.decode().split(" ")
        h = _str(await r.hgetall(keys.file(file_id)))
        if h and await delete_file_record(r, h) is False:
            continue
        if h == {}:
            if await r.scard(keys.file_refs(file_id)):
                continue  # metadata expired on its own; the content waits for its last batch
            await add_usage(r, owner, "stored_bytes", -int(size))
        await storage.delete(storage_key)
        await r.zrem(keys.FILE_EXPIRY, member)
        swept += 1
    return swept


# ----------------------------------------------------------------------------- leases
_HOLD_LEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
""")

_DROP_LEASE = Script("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end")


async def hold_lease(r: Redis, key: str, holder: str, ttl_ms: int) -> bool:
    """Take or renew the lease ``key`` for ``holder``; False while someone else holds it."""
    return bool(await _HOLD_LEASE(r, [key], [holder, ttl_ms]))


async def drop_lease(r: Redis, key: str, holder: str) -> None:
    """Give the lease up at once (a peer need not wait for it to expire), if ``holder`` has it."""
    await _DROP_LEASE(r, [key], [holder])


# ----------------------------------------------------------------------------- quotas
# Add every (field, amount, limit) to an owner's usage only if none would pass its limit.
_RESERVE = Script("""
for i = 1, #ARGV, 3 do
  local used = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if used + tonumber(ARGV[i + 1]) > tonumber(ARGV[i + 2]) then return ARGV[i] end
end
for i = 1, #ARGV, 3 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return ''
""")


async def reserve(r: Redis, owner: str, **wanted: tuple[int, int]) -> str | None:
    """Count ``field=(amount, limit)`` against an owner's usage; the field over its limit, or None."""
    argv: list[str | int] = []
    for name, (amount, limit) in wanted.items():
        argv += [name, amount, limit]
    over = await _RESERVE(r, [keys.owner_usage(owner)], argv)
    over = over.decode() if isinstance(over, bytes) else over
    return over or None


async def usage(r: Redis, owner: str, name: str) -> int:
    """One usage counter of an owner."""
    return int(await r.hget(keys.owner_usage(owner), name) or 0)


async def add_usage(r: Redis, owner: str, name: str, amount: int) -> None:
    """Move a usage counter without a limit (results are always kept; deletes give back)."""
    await r.hincrby(keys.owner_usage(owner), name, amount)


_RELEASE_BATCH = Script("""
if redis.call('HSETNX', KEYS[1], 'released', '1') == 1 then
  redis.call('HINCRBY', KEYS[2], 'active_batches', -1)
  redis.call('HINCRBY', KEYS[2], 'enqueued_lines', -tonumber(redis.call('HGET', KEYS[1], 'reserved_lines') or '0'))
end
""")
