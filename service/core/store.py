"""File and batch metadata in Redis, and the atomic scripts that move batches between states.

Metadata lives in Redis hashes so that every process (web, workers, finalizer, on any host)
sees the same state; file *contents* live in ``storage``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import secrets
import time
from typing import Callable, Iterable, TypedDict, TypeVar, cast

import msgspec
import structlog

from . import counters, keys, leases
from .connections import Pipeline, Script, Value, run_scripts
from .connections import Redis as Redis
from .leases import FencedScript, Lease, LeaseLost
from .records import BatchField, BatchRecord, FileField, FileRecord
from .shards import ShardKey
from .storage import Storage
from .wire import (
    TERMINAL_STATUSES,
    Batch,
    BatchErrors,
    BatchStatus,
    BatchUsage,
    FileObject,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
)

log = structlog.get_logger("sluice.store")
# ``Redis`` is re-exported (``as Redis`` above): modules name the client type ``store.Redis``.

# Ids embed the creation sequence so that a deleted id still works as a list cursor.
_ID = re.compile(r"^(file-|batch_)([0-9a-f]{12})([0-9a-f]{12})$")


def now() -> int:
    """Unix time in whole seconds, as every ``*_at`` field carries it."""
    return int(time.time())


def owner_of(token: str) -> str:
    """The owner id for an API token: a hash, so tokens are never stored."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


# New files take the shards in turn, from a random start in each process: a few dozen uploads already
# spread evenly over the shards (and so over a cluster's masters), where random picks would not.
_NEXT_SHARD = itertools.count(random.randrange(keys.SHARDS))


async def new_id(r: Redis, prefix: str, *, shard: int | None = None) -> tuple[str, int]:
    """A fresh ``file-``/``batch_`` id and its sequence number.

    Its last hex digit is its shard (``keys.shard_of``): the next in this process's turn, unless
    ``shard`` is given (a batch goes to its input file's shard, a result file to its batch's).
    """
    seq = await r.incr(keys.SEQ)
    if shard is None:
        shard = next(_NEXT_SHARD) % keys.SHARDS
    tail = secrets.token_hex(6)[:-1] + keys.shard_digit(shard)
    return f"{prefix}{seq:012x}{tail}", seq


def seq_of(object_id: str) -> int | None:
    """The sequence number inside an id Sluice generated, or None for anything else."""
    m = _ID.match(object_id)
    return int(m.group(2), 16) if m else None


def valid_id(object_id: str, prefix: str) -> bool:
    """True when ``object_id`` has the shape of a Sluice id with ``prefix``."""
    m = _ID.match(object_id)
    return m is not None and m.group(1) == prefix


# ----------------------------------------------------------------------------- owner <-> shard operations
# An owner's quota counters and lists live in the owner's slot, files and batches in their shard's
# (keys.py): an operation that meets both is two single-slot steps joined by an operation id
# (docs/cluster-design.md, "Two-step operations").
#
# - Creating a file or batch: step 1 on the owner reserves the quota under ``owner_op(owner, id)``
#   (the answer recorded: a re-run answers the same), adds the id to the owner's lists and notes the
#   reservation in ``owner_pending``; step 2 on the shard writes the record unless ``creation(id)``
#   says it was given up (``aborted``), and marks it ``created``; step 3 drops the pending note. The
#   API answers after step 2. If a call fails for good, ``settle`` decides on the shard, atomically,
#   "created" or "aborted", and in the second case gives the reservation back on the owner, once.
#   A creator that dies between the steps leaves its pending note: the usage audit settles notes older
#   than PENDING_STALE_S the same way.
# - Giving quota back (a batch's release, a file's forget): step 1 on the shard is the one winner
#   (the ``released`` flag, the tombstone) and adds ``"<op> <owner> <id> <purpose> <deltas>"`` to the
#   shard's outbox in the same script; step 2 applies the deltas on the owner unless
#   ``owner_op(owner, op)`` exists; step 3 removes the outbox entry. Entries left by a process that
#   died between the steps are applied by ``replay_outbox``.
class QuotaExceeded(Exception):
    """An operation was refused because it would take ``field`` of an owner's usage past its limit."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class Aborted(RuntimeError):
    """A creation was settled as never made (``settle``) before this call of it could make it."""


# Recorded as an operation's answer by ``settle``: the operation never ran and never will.
_ABORTED = "!aborted"
# How long an operation's answer is kept for a re-run: far beyond redis-py's retries of one call.
OP_TTL_S = 24 * 3600
# A creation reserved this long ago and still pending is taken for one whose creator died or stalled:
# the usage audit settles it (its record, if not written yet, never will be). Far beyond any call.
PENDING_STALE_S = 600
# Outbox entries younger than this belong to a call still under way; older ones are replayed.
OUTBOX_REPLAY_AFTER_S = 10.0

# A reservation's deltas, ``field:delta`` pairs, as pending notes and outbox entries carry them.
_DELTA_LUA = "string.gmatch(%s, '([%%w_]+):(%%-?%%d+)')"

# Step 1 of a creation, on the owner: reserve every (field, delta, limit) triple unless one passes its
# limit (< 0: none); the answer ('' or the field over its limit) is recorded under the op key.
_RESERVE = Script(
    keys=("usage", "op", "pending", "*indexes"),
    args=("op_ttl", "object_id", "seq", "note", "*reserve"),
    source="""
local prior = redis.call('GET', KEYS.op)
if prior then return prior end
local answer = ''
for i = 5, #ARGV, 3 do
  local limit = tonumber(ARGV[i + 2])
  if limit >= 0 and tonumber(redis.call('HGET', KEYS.usage, ARGV[i]) or '0') + tonumber(ARGV[i + 1]) > limit then
    answer = ARGV[i]
    break
  end
end
if answer == '' then
  for i = 5, #ARGV, 3 do redis.call('HINCRBY', KEYS.usage, ARGV[i], ARGV[i + 1]) end
  redis.call('HINCRBY', KEYS.usage, 'rev', 1)
  for i = 4, #KEYS do redis.call('ZADD', KEYS[i], ARGV.seq, ARGV.object_id) end
  redis.call('HSET', KEYS.pending, ARGV.object_id, ARGV.note)
end
redis.call('SET', KEYS.op, answer, 'EX', ARGV.op_ttl)
return answer
""",
)


def _owner_indexes(owner: str, object_id: str, purpose: str) -> list[str]:
    """The owner's lists a file or batch id is in."""
    if object_id.startswith("batch_"):
        return [keys.owner_batches(owner)]
    return [keys.owner_files(owner)] + ([keys.owner_files(owner, purpose)] if purpose != "-" else [])


def _deltas(pairs: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"{field}:{delta}" for field, delta in pairs)


async def _reserve(
    r: Redis,
    owner: str,
    object_id: str,
    seq: int,
    purpose: str,
    reserve: list[tuple[str, int, int]],
) -> None:
    """Step 1 of a creation: :class:`QuotaExceeded` if refused (now or by an earlier run of the same op)."""
    await r.sadd(keys.OWNERS, owner)  # before the reservation, so the audit never misses an owner with usage
    note = f"{int(time.time() * 1000)} {_deltas((f, d) for f, d, _ in reserve)} {purpose}"
    flat: list[str | int] = []
    for field, delta, limit in reserve:
        flat += [field, delta, limit]
    _raise_for(
        _text(
            await _RESERVE(
                r,
                usage=keys.owner_usage(owner),
                op=keys.owner_op(owner, object_id),
                pending=keys.owner_pending(owner),
                indexes=_owner_indexes(owner, object_id, purpose),
                op_ttl=OP_TTL_S,
                object_id=object_id,
                seq=seq,
                note=note,
                reserve=flat,
            )
        )
    )


async def _created(r: Redis, owner: str, object_id: str) -> None:
    """Step 3 of a creation: its record exists, the reservation is no longer pending.

    Not fenced: it only says what the shard already says (a failure leaves the note to the audit).
    """
    await r.hdel(keys.owner_pending(owner), object_id)


# Settle an operation whose call failed, on the owner: record that it never ran (so a late copy of it
# does nothing), unless it did run; answer what it answered ('' for a reservation made). A pending
# note without its op (outlived by a day: the audit did not run) goes: the recount decides.
_SETTLE = Script(
    keys=("op", "pending"),
    args=("op_ttl", "marker", "object_id"),
    source="""
local prior = redis.call('GET', KEYS.op)
if prior then return prior end
redis.call('SET', KEYS.op, ARGV.marker, 'EX', ARGV.op_ttl)
redis.call('HDEL', KEYS.pending, ARGV.object_id)
return ARGV.marker
""",
)

# On the shard: a reserved creation whose call failed was made ('created') or is given up now
# ('aborted'), whichever came first; step 2 checks the same key, so the two never both win.
_DECIDE = Script(
    keys=("creation",),
    args=("op_ttl",),
    source="""
local state = redis.call('GET', KEYS.creation)
if state then return state end
redis.call('SET', KEYS.creation, 'aborted', 'EX', ARGV.op_ttl)
return 'aborted'
""",
)

# On the owner: give an aborted creation's reservation back, once (the op moves from '' to aborted).
_GIVE_BACK = Script(
    keys=("usage", "op", "pending", "*indexes"),
    args=("op_ttl", "object_id", "marker"),
    source=f"""
if redis.call('GET', KEYS.op) ~= '' then return 0 end
local note = redis.call('HGET', KEYS.pending, ARGV.object_id)
if note then
  for field, delta in {_DELTA_LUA % "note"} do redis.call('HINCRBY', KEYS.usage, field, -tonumber(delta)) end
  redis.call('HINCRBY', KEYS.usage, 'rev', 1)
end
redis.call('HDEL', KEYS.pending, ARGV.object_id)
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV.object_id) end
redis.call('SET', KEYS.op, ARGV.marker, 'EX', ARGV.op_ttl)
return 1
""",
)


async def settle(r: Redis, owner: str, op_id: str) -> str | None:
    """After a call of ``create_file``/``create_batch`` failed: None if it did not apply (and never
    will), else its answer ("" when the object was created, else the field over its quota).

    ``op_id`` is the file or batch id. A reservation whose record is not written yet is given up
    for good on the shard (a late step 2 then writes nothing) and given back on the owner, once; a
    record already written keeps it. Safe to repeat, and to race with a late copy of the call.
    """
    answer = _text(
        await _SETTLE(
            r,
            op=keys.owner_op(owner, op_id),
            pending=keys.owner_pending(owner),
            op_ttl=OP_TTL_S,
            marker=_ABORTED,
            object_id=op_id,
        )
    )
    if answer != "":
        return None if answer == _ABORTED else answer
    if _text(await _DECIDE(r, creation=keys.creation(op_id), op_ttl=OP_TTL_S)) == "created":
        await _created(r, owner, op_id)
        return ""
    note = _text(await r.hget(keys.owner_pending(owner), op_id)) or "0 - -"
    await _GIVE_BACK(
        r,
        usage=keys.owner_usage(owner),
        op=keys.owner_op(owner, op_id),
        pending=keys.owner_pending(owner),
        indexes=_owner_indexes(owner, op_id, note.split(" ")[2]),
        op_ttl=OP_TTL_S,
        object_id=op_id,
        marker=_ABORTED,
    )
    return None


# Step 2 of a release or forget, on the owner: apply the deltas unless this op did already; drop the
# id from the owner's lists (a forgotten file's).
_APPLY = Script(
    keys=("usage", "op", "*indexes"),
    args=("op_ttl", "object_id", "deltas"),
    source=f"""
if redis.call('EXISTS', KEYS.op) == 1 then return 0 end
for field, delta in {_DELTA_LUA % "ARGV.deltas"} do redis.call('HINCRBY', KEYS.usage, field, delta) end
redis.call('HINCRBY', KEYS.usage, 'rev', 1)
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV.object_id) end
redis.call('SET', KEYS.op, 'applied', 'EX', ARGV.op_ttl)
return 1
""",
)


class _Entry(msgspec.Struct, frozen=True):
    """An outbox entry: ``"<op> <owner> <id> <purpose> <deltas>"``."""

    op: str
    owner: str
    object_id: str
    purpose: str
    deltas: str

    @classmethod
    def parse(cls, text: str) -> "_Entry":
        op, owner, object_id, purpose, deltas = text.split(" ")
        return cls(op, owner, object_id, purpose, deltas)


async def _apply_entry(r: Redis, shard: int, entry: str) -> None:
    """Steps 2 and 3 of a release or forget whose step 1 left ``entry`` in the shard's outbox."""
    e = _Entry.parse(entry)
    await _APPLY(
        r,
        usage=keys.owner_usage(e.owner),
        op=keys.owner_op(e.owner, e.op),
        indexes=_owner_indexes(e.owner, e.object_id, e.purpose) if e.object_id.startswith("file-") else [],
        op_ttl=OP_TTL_S,
        object_id=e.object_id,
        deltas=e.deltas,
    )
    # Not fenced: the entry's effect is applied, so removing it is right whoever does it.
    await r.zrem(keys.outbox(shard), entry)


async def _complete(r: Redis, shard: int, entry: str, what: str) -> None:
    """``_apply_entry`` after a step 1 that won: what fails here is left to ``replay_outbox``."""
    try:
        await _apply_entry(r, shard, entry)
    except Exception as e:  # the step that decides (the shard's) has happened: the rest can wait
        log.warning("outbox_deferred", what=what, entry=entry, error=f"{type(e).__name__}: {e}")


async def replay_outbox(
    r: Redis,
    shard: int,
    older_than_s: float = OUTBOX_REPLAY_AFTER_S,
    *,
    limit: int = 100,
) -> int:
    """Apply the shard's outbox entries older than ``older_than_s`` (their process died between the
    steps of a release or forget); return how many.

    Safe to run anywhere, any number of times, concurrently with the calls themselves: each entry's
    deltas apply once (``owner_op``). An entry older than the op keys' lifetime could be applied a
    second time, so it is logged (``outbox_entry_abandoned``) and dropped: the usage audit recounts
    what it stood for. Meant for the finalizer's sweep chore, for every shard.
    """
    now_ms = time.time() * 1000
    outbox = keys.outbox(shard)
    # Older than the op keys live: applying it again could apply it twice.
    for raw in await r.zrangebyscore(outbox, "-inf", now_ms - (OP_TTL_S - 60) * 1000, start=0, num=limit):
        log.error("outbox_entry_abandoned", shard=shard, entry=raw.decode())
        await r.zrem(outbox, raw.decode())
    replayed = 0
    for raw in await r.zrangebyscore(outbox, "-inf", now_ms - older_than_s * 1000, start=0, num=limit):
        await _apply_entry(r, shard, raw.decode())
        log.info("outbox_replayed", shard=shard, entry=raw.decode())
        replayed += 1
    return replayed


# ----------------------------------------------------------------------------- files
# Step 2 of a file's creation, on its shard: write the record (with its expiry) unless the creation
# was settled as given up; fields are the record's (field, value) pairs, expires_at '' for none.
# A re-run (a re-sent call, the finalizer registering a result file again) writes nothing more.
_CREATE_FILE = FencedScript(
    keys=("creation", "file", "file_expiry"),
    args=("op_ttl", "expires_at", "expiry_member", "*fields"),
    source=f"""
local state = redis.call('GET', KEYS.creation)
if state == 'aborted' then return '{_ABORTED}' end
if state then return '' end
redis.call('HSET', KEYS.file, unpack(ARGV, 4))
if ARGV.expires_at ~= '' then
  redis.call('EXPIREAT', KEYS.file, ARGV.expires_at)
  redis.call('ZADD', KEYS.file_expiry, ARGV.expires_at, ARGV.expiry_member)
end
redis.call('SET', KEYS.creation, 'created', 'EX', ARGV.op_ttl)
return ''
""",
)


async def create_file(
    r: Redis,
    *,
    owner: str,
    file_id: str,
    seq: int,
    filename: str,
    purpose: str,
    size: int,
    storage_key: str,
    expires_at: int | None,
    created_at: int | None = None,
    lines: int = 0,
    max_stored_bytes: int | None = None,
    lease: Lease | None = None,
) -> FileObject:
    """Charge a stored file's size to its owner and index it, then record its metadata (two steps,
    see "owner <-> shard operations" above).

    With ``max_stored_bytes`` the file is refused (:class:`QuotaExceeded`) instead when the
    owner's stored bytes would pass it; result files have no limit (results are always kept).
    ``file_id`` is the operation's id: repeating the call (redis-py re-sending it after a lost
    reply, the finalizer registering a result file again) changes nothing and answers the same; after
    ``settle`` gave it up it raises :class:`Aborted`.

    With ``lease`` (the finalizer's, for a result file), the record is written only while it is held
    (``LeaseLost``). The charge, on the owner's slot, cannot be fenced by a lease of the batch's slot;
    it is checked first (a holder known to be stale charges nothing) and otherwise safe as it is: the
    file id is fixed on the batch under the lease before any charge, so every finalizer of the batch
    charges the same operation, once; a stale holder whose charge lands after it lost the lease
    charges what its successor charges (the same op) or, if no one ever writes the record, leaves a
    pending reservation that the usage audit gives back after PENDING_STALE_S (and the successor
    then draws a new id: :class:`Aborted`).
    """
    created = created_at or now()
    record: dict[str, str | int] = {
        FileField.ID: file_id,
        FileField.OWNER: owner,
        FileField.BYTES: size,
        FileField.CREATED_AT: created,
        FileField.FILENAME: filename,
        FileField.PURPOSE: purpose,
        FileField.STORAGE_KEY: storage_key,
        FileField.EXPIRES_AT: expires_at or "",
        FileField.LINES: lines,
    }
    if lease is not None and _text(await r.get(lease.key)) != lease.value:
        raise LeaseLost(f"{lease.key} is no longer held by {lease.value}")
    limit = -1 if max_stored_bytes is None else max_stored_bytes
    await _reserve(r, owner, file_id, seq, purpose, [("stored_bytes", size, limit)])
    answer = await _CREATE_FILE(
        r,
        creation=keys.creation(file_id),
        file=keys.file(file_id),
        file_expiry=keys.file_expiry(keys.shard_of(file_id)),
        op_ttl=OP_TTL_S,
        expires_at=expires_at or "",
        expiry_member=expiry_member(file_id, storage_key, owner, size),
        fields=record,
        lease=lease,
    )
    _raise_for(_text(answer))
    await _created(r, owner, file_id)
    return file_from_record(FileRecord.from_hash(_as_hash(record)))


def _as_hash(fields: dict[str, str | int]) -> dict[bytes, bytes]:
    """``fields`` as Redis gives them back once written: the record a later read decodes."""
    return {k.encode(): str(v).encode() for k, v in fields.items()}


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _raise_for(answer: str | None) -> None:
    if answer == _ABORTED:
        # Only a late copy of a call already given up (and settled) can meet this.
        raise Aborted("the operation was settled as never applied")
    if answer:
        raise QuotaExceeded(answer)


def file_from_record(rec: FileRecord) -> FileObject:
    """The wire object for a file's record."""
    return FileObject(
        id=rec.id,
        bytes=rec.bytes,
        created_at=rec.created_at,
        filename=rec.filename,
        purpose=rec.purpose,
        expires_at=rec.expires_at,
    )


async def get_file_record(r: Redis, owner: str, file_id: str) -> FileRecord | None:
    """The record of ``file_id`` if ``owner`` may see it."""
    if not valid_id(file_id, "file-"):
        return None
    raw = await r.hgetall(keys.file(file_id))
    if not raw:
        return None
    rec = FileRecord.from_hash(raw)
    return rec if rec.owner == owner else None


def expiry_member(file_id: str, storage_key: str, owner: str, size: int | str) -> str:
    """The entry of a file in its shard's ``keys.file_expiry``: enough to remove it after its record expired."""
    return f"{file_id} {storage_key} {owner} {size}"


# How long a deleted file's tombstone (keys.file_tombstone) lasts: far longer than redis-py takes
# to re-send a command whose reply was lost (a few retries within a minute), short enough to cost
# nothing.
FILE_TOMBSTONE_S = 600

# Forget a file (step 1 on its shard), exactly once however often the call is repeated or raced: the
# record must belong to the owner; it is deleted with its expiry entry, the bytes to give back go to
# the shard's outbox (steps 2 and 3 apply them on the owner and drop the id from its lists), and a
# tombstone holding that outbox entry names the operation that did it, so that a re-sent call (same
# op id) answers "forgotten" again (with the entry, while it is still to apply) and every other one
# answers "not found". A record that has already expired (its TTL) is forgotten through its expiry
# entry, which still carries its owner and size: whoever removes that entry gives the bytes back.
# When no batch reads the content any more, a marker (an expiry entry of size 0, due after the
# tombstone) is left for the expiry sweep: the caller removes the content and then the marker, and if
# it dies in between the sweep does it. expiry_member is '' if none; size and purpose are for the
# expired case ('-': unknown). Returns {forgotten (0/1), batches still reading the content, the
# outbox entry or ''}.
_FORGET_FILE = FencedScript(
    keys=("record", "tombstone", "file_expiry", "refs", "outbox"),
    args=(
        "owner",
        "op_id",
        "tombstone_ttl",
        "expiry_member",
        "size",
        "purpose",
        "file_id",
        "marker",
        "marker_due",
        "now_ms",
    ),
    source="""
local tomb = redis.call('GET', KEYS.tombstone)
if tomb then
  if string.sub(tomb, 1, #ARGV.op_id + 1) ~= ARGV.op_id .. ' ' then return {0, 0, ''} end
  if not redis.call('ZSCORE', KEYS.outbox, tomb) then tomb = '' end
  return {1, redis.call('SCARD', KEYS.refs), tomb}
end
local owner = redis.call('HGET', KEYS.record, 'owner')
local size, purpose = ARGV.size, ARGV.purpose
if owner then
  if owner ~= ARGV.owner then return {0, 0, ''} end
  size = redis.call('HGET', KEYS.record, 'bytes')
  purpose = redis.call('HGET', KEYS.record, 'purpose') or purpose
  redis.call('DEL', KEYS.record)
  if ARGV.expiry_member ~= '' then redis.call('ZREM', KEYS.file_expiry, ARGV.expiry_member) end
elseif ARGV.expiry_member == '' or redis.call('ZREM', KEYS.file_expiry, ARGV.expiry_member) == 0 then
  return {0, 0, ''}
end
local entry = ARGV.op_id .. ' ' .. ARGV.owner .. ' ' .. ARGV.file_id .. ' ' .. purpose .. ' stored_bytes:-' .. size
redis.call('ZADD', KEYS.outbox, ARGV.now_ms, entry)
redis.call('SET', KEYS.tombstone, entry, 'EX', ARGV.tombstone_ttl)
local refs = redis.call('SCARD', KEYS.refs)
if refs == 0 then redis.call('ZADD', KEYS.file_expiry, ARGV.marker_due, ARGV.marker) end
return {1, refs, entry}
""",
)


async def _forget_file(
    r: Redis,
    *,
    file_id: str,
    storage_key: str,
    owner: str,
    op_id: str,
    member: str,
    size: int | str,
    purpose: str,
    lease: Lease | None = None,
) -> tuple[bool, str | None]:
    marker = content_marker(file_id, storage_key, owner)
    shard = keys.shard_of(file_id)
    forgotten, refs, entry = await _FORGET_FILE(
        r,
        record=keys.file(file_id),
        tombstone=keys.file_tombstone(file_id),
        file_expiry=keys.file_expiry(shard),
        refs=keys.file_refs(file_id),
        outbox=keys.outbox(shard),
        owner=owner,
        op_id=op_id,
        tombstone_ttl=FILE_TOMBSTONE_S,
        expiry_member=member,
        size=size,
        purpose=purpose,
        file_id=file_id,
        marker=marker,
        marker_due=now() + FILE_TOMBSTONE_S + 60,
        now_ms=int(time.time() * 1000),
        lease=lease,
    )
    if entry:
        await _complete(r, shard, _text(entry) or "", "forget")
    return bool(forgotten), marker if forgotten and int(refs) == 0 else None


def content_marker(file_id: str, storage_key: str, owner: str) -> str:
    """The expiry entry that has the sweep remove a forgotten file's content (its bytes already given back)."""
    return expiry_member(file_id, storage_key, owner, 0)


def new_op_id() -> str:
    """An id for one mutation, recorded by the script that applies it (see ``delete_file``)."""
    return secrets.token_hex(12)


async def delete_file(r: Redis, rec: FileRecord, op_id: str) -> tuple[bool, str | None]:
    """Delete the file whose record is ``rec`` for its owner, as operation ``op_id``.

    Returns ``(deleted, marker)``. Of any number of concurrent deletes of one file (and the expiry
    sweep) exactly one gets ``deleted`` and gives the bytes back, once, in the script that deletes
    the record (on the file's shard) and a second step on the owner's counters (see "owner <-> shard
    operations": should that step fail, the sweep's ``replay_outbox`` applies it); running the same
    ``op_id`` again (redis-py re-sending it after a lost reply) answers ``deleted`` again and changes
    nothing. ``marker`` is set when no unfinished batch reads the content any more: the caller
    removes the content, then calls ``content_removed(marker)``; should it fail or die first, the
    expiry sweep removes the content later. Otherwise the last batch to end removes it (``release``).
    """
    member = expiry_member(rec.id, rec.storage_key, rec.owner, rec.bytes) if rec.expires_at else ""
    return await _forget_file(
        r,
        file_id=rec.id,
        storage_key=rec.storage_key,
        owner=rec.owner,
        op_id=op_id,
        member=member,
        size=rec.bytes,
        purpose=rec.purpose,
    )


# A forgotten file's content is gone: its marker in the shard's expiry index goes too.
_UNMARK = FencedScript(
    keys=("file_expiry",), args=("marker",), source="redis.call('ZREM', KEYS.file_expiry, ARGV.marker)"
)


async def content_removed(r: Redis, marker: str, lease: Lease | None = None) -> None:
    """The content a ``delete_file`` marker stands for is gone: the sweep need not remove it."""
    await _UNMARK(r, file_expiry=keys.file_expiry(keys.shard_of(marker.split(" ")[0])), marker=marker, lease=lease)


R = TypeVar("R")


async def page(
    r: Redis,
    zkey: str,
    record_key: Callable[[str], str],
    decode: Callable[[dict[bytes, bytes]], R],
    *,
    after: str | None,
    limit: int,
    desc: bool,
    pending: str | None = None,
) -> tuple[list[R], bool]:
    """One page of records from an owner index (each decoded with ``decode``, e.g.
    ``BatchRecord.from_hash``), after the cursor id, and whether more follow.

    Ids whose record has expired are pruned from the index on the way, so a page is never
    short while more records follow (the SDK stops paging at the first empty page). An id still in
    ``pending`` (the owner's ``keys.owner_pending``: a creation whose record may not be written yet)
    is left out of the page but kept in the index.
    """
    if after is None:
        lo, hi = "-inf", "+inf"
    else:
        seq = seq_of(after)
        lo, hi = (f"({seq}", "+inf") if not desc else ("-inf", f"({seq}")
    found: list[R] = []
    while True:
        want = limit + 1 - len(found)
        if desc:
            raw = await r.zrevrangebyscore(zkey, hi, lo, start=0, num=want)
        else:
            raw = await r.zrangebyscore(zkey, lo, hi, start=0, num=want)
        ids = [i.decode() for i in raw]
        # Read before the records: an id no longer pending then had its record written (or its
        # creation given up) already, so a record missing afterwards is gone for good.
        in_flight = await r.hmget(pending, ids) if pending and ids else [None] * len(ids)
        pipe = r.pipeline(transaction=False)
        for object_id in ids:
            pipe.hgetall(record_key(object_id))
        gone = []
        for object_id, h, note in zip(ids, await pipe.execute(), in_flight):
            if h:
                found.append(decode(h))
            elif note is None:
                gone.append(object_id)
        if gone:
            await r.zrem(zkey, *gone)
        last = seq_of(ids[-1]) if ids else None  # an index is scored by the ids' sequence numbers
        if len(found) > limit or len(ids) < want or last is None:
            return found[:limit], len(found) > limit
        if desc:
            hi = f"({last}"
        else:
            lo = f"({last}"


# ----------------------------------------------------------------------------- batches
# Step 2 of a batch's creation, on its shard: write the record, queued for validation, and the
# batch's claim on its input file, unless the creation was settled as given up; fields are the
# record's (field, value) pairs. A re-run writes nothing more (the record may have moved on).
_CREATE_BATCH = FencedScript(
    keys=("creation", "batch", "file_refs", "pending_validation"),
    args=("op_ttl", "batch_id", "*fields"),
    source=f"""
local state = redis.call('GET', KEYS.creation)
if state == 'aborted' then return '{_ABORTED}' end
if state then return '' end
redis.call('HSET', KEYS.batch, unpack(ARGV, 3))
redis.call('SADD', KEYS.file_refs, ARGV.batch_id)
redis.call('ZADD', KEYS.pending_validation, 0, ARGV.batch_id)
redis.call('SET', KEYS.creation, 'created', 'EX', ARGV.op_ttl)
return ''
""",
)


async def create_batch(
    r: Redis,
    *,
    owner: str,
    batch_id: str,
    seq: int,
    endpoint: str,
    input_file_id: str,
    input_key: str,
    completion_window: str,
    window_s: int,
    metadata: dict[str, str] | None,
    output_expires_after: int | None,
    provider: str = "",
    sealed_key: str = "",
    reserved_lines: int = 0,
    webhook_url: str = "",
    priority: str = "normal",
    max_active_batches: int,
    max_enqueued_lines: int,
    trace: dict[str, str] | None = None,
) -> BatchRecord:
    """Reserve the owner's quota for a new batch, then record it in ``validating``, queued for
    validation (two steps, see "owner <-> shard operations"); :class:`QuotaExceeded` names the quota
    it would pass.

    ``batch_id`` is the operation's id: a repeated call (redis-py re-sending it after a lost reply)
    reserves nothing more and answers the same. A call that fails between the steps leaves a
    reservation that ``settle`` (the caller's, or the usage audit's for a creator that died) either
    keeps, if the batch was recorded, or gives back, for good; the reservation is given back by
    :func:`release` when the batch ends. ``trace``: the batch's trace fields
    (``tracing.new_batch_fields``), when tracing is on.
    """
    created = now()
    F = BatchField
    fields: dict[str, str | int] = {
        F.ID: batch_id,
        F.OWNER: owner,
        F.ENDPOINT: endpoint,
        F.INPUT_FILE_ID: input_file_id,
        F.INPUT_KEY: input_key,
        F.COMPLETION_WINDOW: completion_window,
        F.STATUS: "validating",
        F.CREATED_AT: created,
        F.EXPIRES_AT: created + window_s,
        F.TOTAL: 0,
        F.COMPLETED: 0,
        F.FAILED: 0,
        F.METADATA: msgspec.json.encode(metadata).decode() if metadata is not None else "",
        F.OUTPUT_EXPIRES_AFTER: output_expires_after or "",
        F.PROVIDER: provider,
        F.RESERVED_LINES: reserved_lines,
        **(trace or {}),
    }
    fields[F.PRIORITY] = priority
    if sealed_key:
        fields[F.BYOK] = sealed_key
        # Outlives the key (dropped when the batch ends): a retry must not fall back to the server's key.
        fields[F.BYOK_USED] = 1
    if webhook_url:
        fields[F.WEBHOOK_URL] = webhook_url
    await _reserve(
        r,
        owner,
        batch_id,
        seq,
        "-",
        [
            ("active_batches", 1, max_active_batches),
            ("enqueued_lines", reserved_lines, max_enqueued_lines),
        ],
    )
    answer = await _CREATE_BATCH(
        r,
        creation=keys.creation(batch_id),
        batch=keys.batch(batch_id),
        file_refs=keys.file_refs(input_file_id),
        pending_validation=keys.pending_validation(keys.shard_of(batch_id)),
        op_ttl=OP_TTL_S,
        batch_id=batch_id,
        fields=fields,
    )
    _raise_for(_text(answer))
    await _created(r, owner, batch_id)
    return BatchRecord.from_hash(_as_hash(fields))


async def get_batch_record(r: Redis, batch_id: str) -> BatchRecord | None:
    """The record of a batch, or None."""
    raw = await r.hgetall(keys.batch(batch_id))
    return BatchRecord.from_hash(raw) if raw else None


async def get_owned_batch(r: Redis, owner: str, batch_id: str) -> BatchRecord | None:
    """The record of ``batch_id`` if ``owner`` may see it."""
    if not valid_id(batch_id, "batch_"):
        return None
    rec = await get_batch_record(r, batch_id)
    if rec is None or rec.owner != owner:
        return None
    return rec


def batch_from_record(rec: BatchRecord) -> Batch:
    """The wire object for a batch's record."""
    return Batch(
        id=rec.id,
        endpoint=rec.endpoint,
        input_file_id=rec.input_file_id,
        completion_window=rec.completion_window,
        status=cast(BatchStatus, rec.status),  # None only in a partial record, which no API call answers with
        created_at=rec.created_at,
        model=rec.model or None,
        errors=BatchErrors(data=rec.errors) if rec.errors else None,
        output_file_id=rec.output_file_id or None,
        error_file_id=rec.error_file_id or None,
        request_counts=_counts(rec),
        usage=batch_usage(rec),
        metadata=rec.metadata,
        in_progress_at=rec.in_progress_at,
        expires_at=rec.expires_at,
        finalizing_at=rec.finalizing_at,
        completed_at=rec.completed_at,
        failed_at=rec.failed_at,
        expired_at=rec.expired_at,
        cancelling_at=rec.cancelling_at,
        cancelled_at=rec.cancelled_at,
    )


def batch_usage(rec: BatchRecord) -> BatchUsage:
    """The batch's token usage so far (``usage_*`` fields, counted as each line is recorded)."""
    return BatchUsage(
        input_tokens=rec.usage_input,
        input_tokens_details=InputTokensDetails(cached_tokens=rec.usage_cached),
        output_tokens=rec.usage_output,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=rec.usage_reasoning),
        total_tokens=rec.usage_input + rec.usage_output,
    )


def _counts(rec: BatchRecord) -> RequestCounts:
    total, completed, failed = rec.total, rec.completed, rec.failed
    # Lines a provider's own Batch API reports done that Sluice has not downloaded yet
    # (workers/delegate.py keeps these up to date), within what is left.
    shown_completed = min(max(0, rec.deleg_completed), max(0, total - completed - failed))
    shown_failed = min(max(0, rec.deleg_failed), max(0, total - completed - failed - shown_completed))
    return RequestCounts(total=total, completed=completed + shown_completed, failed=failed + shown_failed)


# Move a batch to a new state only if it is in one of the allowed states (comma-separated); set
# fields (pairs); optionally add it to sets, remove it from others and delete keys, all atomically:
# sets holds the first ``adds`` sets to add to, then those to remove from, then ``dels`` keys to delete.
_TRANSITION = FencedScript(
    keys=("batch", "webhooks_due", "*sets"),
    args=("batch_id", "allowed", "adds", "expire_s", "dels", "*fields"),
    source="""
local st = redis.call('HGET', KEYS.batch, 'status')
if not st then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV.allowed, '[^,]+') do
  if s == st then allowed = true end
end
if not allowed then return {0, st} end
if #ARGV > 5 then redis.call('HSET', KEYS.batch, unpack(ARGV, 6)) end
if tonumber(ARGV.expire_s) > 0 then
  redis.call('EXPIRE', KEYS.batch, ARGV.expire_s)
  -- A terminal state: the client's provider key (BYOK) must not outlive the batch.
  redis.call('HDEL', KEYS.batch, 'byok')
  -- ... and its completion webhook is due now (once: this branch runs for one transition only).
  if redis.call('HEXISTS', KEYS.batch, 'webhook_url') == 1 then
    redis.call('ZADD', KEYS.webhooks_due, 'NX', 0, ARGV.batch_id)
  end
end
local adds = tonumber(ARGV.adds)
local dels = tonumber(ARGV.dels)
for i = 3, 2 + adds do redis.call('SADD', KEYS[i], ARGV.batch_id) end
for i = 3 + adds, #KEYS - dels do redis.call('SREM', KEYS[i], ARGV.batch_id) end
for i = #KEYS - dels + 1, #KEYS do redis.call('DEL', KEYS[i]) end
return {1, st}
""",
)


async def transition(
    r: Redis,
    batch_id: str,
    *,
    allowed: Iterable[str],
    fields: dict[str, str | int],
    add_to: Iterable[ShardKey] = (),
    remove_from: Iterable[ShardKey] = (),
    expire_s: int = 0,
    delete: Iterable[str] = (),
    lease: Lease | None = None,
) -> tuple[bool, str]:
    """Atomically apply ``fields`` if the batch's status is in ``allowed``.

    Returns (applied, status before); applied is also True when the batch already has the
    target status. ``add_to``/``remove_from`` name per-shard sets of batch ids
    (``keys.active_batches``, ``keys.live_batches``, ...): the batch's shard's are updated in the
    same step; ``expire_s`` > 0 gives the batch record its retention period (terminal states),
    and queues the batch's completion webhook, if it has one, in its shard's
    ``keys.webhooks_due``; the keys in ``delete`` go in the same step (the work keys of a batch
    that ends). With ``lease``, nothing happens unless it is still held (``LeaseLost``).
    """
    shard = keys.shard_of(batch_id)
    adds = [set_key(shard) for set_key in add_to]
    removes = [set_key(shard) for set_key in remove_from]
    delete = list(delete)
    applied, before = await _TRANSITION(
        r,
        batch=keys.batch(batch_id),
        webhooks_due=keys.webhooks_due(shard),
        sets=[*adds, *removes, *delete],
        batch_id=batch_id,
        allowed=",".join(allowed),
        adds=len(adds),
        expire_s=expire_s,
        dels=len(delete),
        fields=fields,
        lease=lease,
    )
    before = before.decode() if isinstance(before, bytes) else str(before)
    # Already in the target state: redis-py retried the script after a dropped connection (its
    # first run applied), or a peer got there first. Either way the transition has happened.
    if not applied and before and before == fields.get(BatchField.STATUS):
        return True, before
    return bool(applied), before


# Record results for lines of one batch, at most once per line: the done bitmap guards against
# redelivery, the result goes to the results stream, the work entry is acknowledged and deleted,
# and the lines newly recorded move, in the same step, the batch's counters, the cluster counters
# and the current minute's history (service/core/counters.py), and the batch's, the day's and the
# token counters' usage (service/core/usage.py): no count is lost or doubled, whatever dies. Every
# counter key is the batch's shard's, so the script touches one cluster slot; readers sum the shards.
# lines holds (index, entry_id, outcome, result, shape, micros, usage) per line; usage is "" or
# "<input> <cached> <output> <reasoning> <provider>|<model>". counters.LUA_EXPAND reads the counter
# keys by their slots (3, 5 to 8). The minute joins the shard's history index, which the history's
# readers fold from (counters.fold_history), also when a paused caller writes a minute already folded.
_RECORD = FencedScript(
    keys=(
        "done",
        "results",
        "batch",
        "lines",
        "metrics_lines",
        "metrics_upstream",
        "metrics_latency",
        "history",
        "usage_day",
        "metrics_tokens",
        "history_index",
    ),
    args=("group", "history_ttl", "minute", "*records"),
    source=(
        """
local recorded = 0
local alive = redis.call('EXISTS', KEYS.results) == 1
local shapes, sums, used = {}, {}, {}
for i = 4, #ARGV, 7 do
  local entry = ARGV[i + 1]
  if entry ~= '' then
    redis.call('XACK', KEYS.lines, ARGV.group, entry)
    redis.call('XDEL', KEYS.lines, entry)
  end
  if alive and redis.call('SETBIT', KEYS.done, ARGV[i], 1) == 0 then
    redis.call('XADD', KEYS.results, 'NOMKSTREAM', '*', 'r', ARGV[i + 3], 'o', ARGV[i + 2])
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
    local u = {string.match(ARGV[i + 6], '^(%d+) (%d+) (%d+) (%d+) (.+)$')}
    if u[5] then
      -- Summed here and written once per call: most lines of a call share a model.
      local t = used[u[5]]
      if not t then
        t = {0, 0, 0, 0, 0}
        used[u[5]] = t
      end
      for k = 1, 4 do t[k] = t[k] + tonumber(u[k]) end
      t[5] = t[5] + 1
    end
  end
end
if recorded == 0 then return 0 end
if next(used) then
  local owner = redis.call('HGET', KEYS.batch, 'owner') or ''
  local day_fresh = false
  for model, t in pairs(used) do
    for k, kind in ipairs({'input', 'cached', 'output', 'reasoning', 'requests'}) do
      local n = t[k]
      if n > 0 then
        n = string.format('%d', n)
        if k < 5 then redis.call('HINCRBY', KEYS.batch, 'usage_' .. kind, n) end
        if redis.call('HINCRBY', KEYS.usage_day, owner .. '|' .. model .. '|' .. kind, n) == tonumber(n) then
          day_fresh = true
        end
        redis.call('HINCRBY', KEYS.metrics_tokens, model .. '|' .. kind, n)
      end
    end
  end
  -- The day's hash gets its TTL when a call creates it (a new field: see counters.LUA_EXPAND).
  if day_fresh then redis.call('EXPIRE', KEYS.usage_day, USAGE_TTL_S) end
end
"""
        + counters.LUA_EXPAND
        + """
-- TTLs and the index are kept up when a call creates the minute's hash or adds the minute to the
-- index, not on every call (four calls of the thirty or so a call makes whatever its lines).
if fresh[8] then redis.call('EXPIRE', KEYS.history, ARGV.history_ttl) end
if redis.call('ZADD', KEYS.history_index, ARGV.minute, ARGV.minute) == 1 then
  -- Minutes whose hash expired unfolded (nobody read the history for a day) leave the index.
  redis.call('ZREMRANGEBYSCORE', KEYS.history_index, '-inf', '(' .. (tonumber(ARGV.minute) - tonumber(ARGV.history_ttl)))
  redis.call('EXPIRE', KEYS.history_index, ARGV.history_ttl)
end
return recorded
"""
    ).replace("USAGE_TTL_S", str(keys.USAGE_RETENTION_DAYS * 86400)),
)


# One line's result: (index, stream entry id, outcome, result line JSON), optionally followed by its
# usage ("" or ``usage.encode``), then by its (shape, micros) from ``counters.Attempts.encode`` when
# it was sent upstream.
Result = (
    tuple[int, str, str, bytes]
    | tuple[int, str, str, bytes, str]
    | tuple[int, str, str, bytes, str, str]
    | tuple[int, str, str, bytes, str, str, str]
)


class Outcome:
    """Which counter a result moves (and which file it lands in)."""

    COMPLETED = "completed"
    FAILED = "failed"


class _RecordCall(TypedDict):
    done: str
    results: str
    batch: str
    lines: str
    metrics_lines: str
    metrics_upstream: str
    metrics_latency: str
    history: str
    usage_day: str
    metrics_tokens: str
    history_index: str
    group: str
    history_ttl: int
    minute: int
    records: list[Value]


def _record_call(batch_id: str, results: Iterable[Result], minute: int) -> _RecordCall:
    records: list[Value] = []
    for result in results:
        index, entry_id, outcome, line, *rest = result
        tokens = rest[0] if len(rest) in (1, 3) else ""
        shape, micros = (rest[-2], rest[-1]) if len(rest) >= 2 else counters.unsent(outcome)
        records += [index, entry_id, outcome, line, shape, micros, tokens]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    shard = keys.shard_of(batch_id)
    return _RecordCall(
        done=keys.done(batch_id),
        results=keys.results(batch_id),
        batch=keys.batch(batch_id),
        lines=keys.lines(batch_id),
        metrics_lines=keys.metrics_lines(shard),
        metrics_upstream=keys.metrics_upstream(shard),
        metrics_latency=keys.metrics_latency(shard),
        history=keys.history(shard, minute),
        usage_day=keys.usage_day(shard, day),
        metrics_tokens=keys.metrics_tokens(shard),
        history_index=keys.history_index(shard),
        group=keys.WORKER_GROUP,
        history_ttl=counters.HISTORY_TTL_S,
        minute=minute,
        records=records,
    )


async def record_results(
    r: Redis,
    batch_id: str,
    results: Iterable[Result],
    *,
    lease: Lease | None = None,
) -> int:
    """Record ``(index, entry_id, outcome, result_json[, usage][, shape, micros])`` tuples; return
    how many were new.

    A line already recorded (a redelivery, or a race with cancellation) changes nothing; a
    batch whose work keys are gone (finished or deleted) records nothing. The lines recorded are
    counted in the cluster counters, the history and the usage in the same step. With ``lease``
    (the finalizer's), nothing is recorded unless it is still held (``LeaseLost``).
    """
    call = _record_call(batch_id, results, counters.minute_of(time.time()))
    if not call["records"]:
        return 0
    return int(await _RECORD(r, lease=lease, **call))


def queue_record(pipe: Pipeline, batch_id: str, results: Iterable[Result]) -> None:
    """Queue ``record_results`` on a pipeline, e.g. to record atomically with another write (MULTI)."""
    _RECORD.queue(pipe, **_record_call(batch_id, results, counters.minute_of(time.time())))


async def record_many(r: Redis, by_batch: dict[str, list[Result]]) -> None:
    """``record_results`` for several batches in one round trip."""
    minute = counters.minute_of(time.time())

    def build(pipe: Pipeline) -> None:
        for batch_id, results in by_batch.items():
            _RECORD.queue(pipe, **_record_call(batch_id, results, minute))

    await run_scripts(r, build, [_RECORD])  # recording twice is harmless


# A batch's claim on its input file goes (the file's keys share the batch's shard); returns the
# claims left and whether the file's record still exists.
_UNCLAIM = FencedScript(
    keys=("refs", "file"),
    args=("batch_id",),
    source="""
redis.call('SREM', KEYS.refs, ARGV.batch_id)
return {redis.call('SCARD', KEYS.refs), redis.call('EXISTS', KEYS.file)}
""",
)


async def release(r: Redis, storage: Storage, rec: BatchRecord, *, lease: Lease | None = None) -> None:
    """A batch reached a terminal state: give back its quota and its claim on the input file.

    The quota goes back in two steps (see "owner <-> shard operations"): the ``released`` flag on
    the batch, with an outbox entry, then the owner's counters (or ``replay_outbox``). Safe to repeat. The content of an input file deleted while the batch ran is removed with
    the last claim. With ``lease``, nothing happens unless it is still held (``LeaseLost``).
    """
    shard = keys.shard_of(rec.id)
    entry = _text(
        await _RELEASE_BATCH(
            r,
            batch=keys.batch(rec.id),
            outbox=keys.outbox(shard),
            now_ms=int(time.time() * 1000),
            lease=lease,
        )
    )
    if entry:
        await _complete(r, shard, entry, "release")
    refs, exists = await _UNCLAIM(
        r, refs=keys.file_refs(rec.input_file_id), file=keys.file(rec.input_file_id), batch_id=rec.id, lease=lease
    )
    if refs == 0 and not exists:
        await storage.delete(rec.input_key)


async def sweep_expired_files(
    r: Redis, storage: Storage, *, shard: int | None = None, limit: int = 100, lease: Lease | None = None
) -> int:
    """Delete the files of ``shard`` (every shard when None) whose ``expires_at`` has passed (content
    kept while a batch still reads it).

    Each file is forgotten by the same script as a DELETE, so a DELETE racing the sweep (or the
    record's own TTL) gives the bytes back once. The content of files forgotten earlier whose
    removal failed or was cut short (their marker is due) is removed too. With ``lease`` (the
    finalizers' "sweep" chore of ``shard``), every Redis write is refused once it is lost
    (``LeaseLost``); deleting the content of a file past its expiry is right whoever does it.
    """
    if lease is not None and shard is None:
        raise ValueError("a fenced sweep covers the shard of its lease: name it")
    swept = 0
    for each in range(keys.SHARDS) if shard is None else [shard]:
        swept += await _sweep_shard(r, storage, each, limit, lease)
    return swept


async def _sweep_shard(r: Redis, storage: Storage, shard: int, limit: int, lease: Lease | None) -> int:
    swept = 0
    for raw in await r.zrangebyscore(keys.file_expiry(shard), "-inf", now(), start=0, num=limit):
        member = raw.decode()
        file_id, storage_key, owner, size = member.split(" ")
        purpose = await r.hget(keys.file(file_id), FileField.PURPOSE)  # None once the record expired on its own
        forgotten, marker = await _forget_file(
            r,
            file_id=file_id,
            storage_key=storage_key,
            owner=owner,
            op_id=f"expiry-{new_op_id()}",
            member=member,
            size=size,
            purpose=purpose.decode() if purpose else "-",
            lease=lease,
        )
        if not forgotten:
            continue  # a DELETE got there first and takes care of the content
        swept += 1
        if marker:
            try:
                await storage.delete(storage_key)
            except Exception as e:
                log.warning(
                    "file_content_delete_failed",
                    file_id=file_id,
                    error=f"{type(e).__name__}: {e}",
                )
                continue  # the marker stays: a later sweep tries again
            await content_removed(r, marker, lease)
    return swept


# ----------------------------------------------------------------------------- quotas
async def usage(r: Redis, owner: str, name: str) -> int:
    """One usage counter of an owner."""
    return int(await r.hget(keys.owner_usage(owner), name) or 0)


# Step 1 of giving a batch's quota back, on its shard, once: the 'released' flag is set and the
# deltas go to the outbox in the same step; a record that is gone (its retention ended) is not
# recreated. Returns the outbox entry while it is still to apply (a re-run returns it too, so that
# whoever calls finishes the job), else ''.
_RELEASE_BATCH = FencedScript(
    keys=("batch", "outbox"),
    args=("now_ms",),
    source="""
if redis.call('EXISTS', KEYS.batch) == 0 then return '' end
local id = redis.call('HGET', KEYS.batch, 'id') or ''
local entry = 'release-' .. id .. ' ' .. (redis.call('HGET', KEYS.batch, 'owner') or '') .. ' ' .. id
  .. ' - active_batches:-1,enqueued_lines:-' .. (redis.call('HGET', KEYS.batch, 'reserved_lines') or '0')
if redis.call('HSETNX', KEYS.batch, 'released', '1') == 1 then
  redis.call('ZADD', KEYS.outbox, ARGV.now_ms, entry)
  return entry
end
if redis.call('ZSCORE', KEYS.outbox, entry) then return entry end
return ''
""",
)


# ----------------------------------------------------------------------------- usage audit
USAGE_FIELDS = ("active_batches", "enqueued_lines", "stored_bytes")
AUDIT_LEASE_MS = 5 * 60 * 1000
# A file record expires at the score of its expiry entry, by Redis's clock: entries due up to
# this far ahead are checked for a missing record, which covers any sane clock skew.
_EXPIRY_SKEW_S = 600
_CHUNK = 500
# Attempts at one owner whose counters keep moving while they are recounted; the next pass retries.
_AUDIT_ATTEMPTS = 3

# Overwrite an owner's counters with the recount, only if neither they nor 'rev' moved since they
# were read; the answer is recorded under the op key (a re-run must not mistake its own write for a
# move). counters holds (field, value read, recount) triples.
_AUDIT_APPLY = Script(
    keys=("usage", "op"),
    args=("op_ttl", "rev", "*counters"),
    source="""
local prior = redis.call('GET', KEYS.op)
if prior then return tonumber(prior) end
local answer = 1
if tonumber(redis.call('HGET', KEYS.usage, 'rev') or '0') ~= tonumber(ARGV.rev) then answer = 0 end
for i = 3, #ARGV, 3 do
  if tonumber(redis.call('HGET', KEYS.usage, ARGV[i]) or '0') ~= tonumber(ARGV[i + 1]) then answer = 0 end
end
if answer == 1 then
  for i = 3, #ARGV, 3 do redis.call('HSET', KEYS.usage, ARGV[i], ARGV[i + 2]) end
  redis.call('HINCRBY', KEYS.usage, 'rev', 1)
end
redis.call('SET', KEYS.op, answer, 'EX', ARGV.op_ttl)
return answer
""",
)


async def audit_usage(r: Redis, storage: Storage, holder: str) -> int:
    """Recount every owner's usage from its records and repair counters that drifted.

    Runs in one process at a time (``keys.USAGE_AUDIT_LOCK``, taken by ``holder``) and walks the
    owners in ``keys.OWNERS``; returns how many owners were repaired, each logged as
    ``usage_repaired`` with the counters before and after. A batch that ended without giving its
    quota back is released on the way, and a creation pending for PENDING_STALE_S is settled
    (``creation_settled``). A repair is applied only if the owner's counters did not move while they
    were recounted (else it is left to the next pass), so it never undoes a concurrent reservation;
    operations half done between an owner and a shard (a creation reserved but not recorded, a
    release or forget not yet applied on the owner) are counted as the counters hold them.
    """
    lease = await leases.take(r, keys.USAGE_AUDIT_LOCK, holder, AUDIT_LEASE_MS)
    if lease is None:
        return 0
    repaired = 0
    try:
        async for owner in r.sscan_iter(keys.OWNERS, count=1000):
            if not await leases.renew(r, lease, AUDIT_LEASE_MS):
                break  # another process took over (this one was paused past the lease)
            repaired += await _audit_owner(r, storage, owner.decode())
    finally:
        await leases.drop(r, lease)
    return repaired


async def _audit_owner(r: Redis, storage: Storage, owner: str) -> int:
    for _ in range(_AUDIT_ATTEMPTS):
        # Read first, recount after: any change on the owner's side in between moves 'rev' (the
        # pending notes are read after the counters: one that appears in between moved 'rev').
        pipe = r.pipeline(transaction=False)
        pipe.hmget(keys.owner_usage(owner), *USAGE_FIELDS, "rev")
        pipe.hgetall(keys.owner_pending(owner))
        read, raw_pending = await pipe.execute()
        before = {name: int(v or 0) for name, v in zip(USAGE_FIELDS, read)}
        pending = {k.decode(): v.decode() for k, v in raw_pending.items()}
        stale_before = (time.time() - PENDING_STALE_S) * 1000
        stale = [object_id for object_id, note in pending.items() if int(note.split(" ")[0]) < stale_before]
        if stale:
            for object_id in stale:
                answer = await settle(r, owner, object_id)
                log.warning("creation_settled", owner=owner, id=object_id, created=answer == "")
            continue
        counted, unreleased = await _recount(r, owner, pending)
        if unreleased:
            for rec in unreleased:
                await release(r, storage, rec)
            continue
        if counted == before:
            return 0
        triples: list[str | int] = []
        for name in USAGE_FIELDS:
            triples += [name, before[name], counted[name]]
        op = f"audit-{secrets.token_hex(8)}"
        if int(
            await _AUDIT_APPLY(
                r,
                usage=keys.owner_usage(owner),
                op=keys.owner_op(owner, op),
                op_ttl=OP_TTL_S,
                rev=int(read[-1] or 0),
                counters=triples,
            )
        ):
            log.warning("usage_repaired", owner=owner, before=before, after=counted)
            return 1
    return 0


def _add(counted: dict[str, int], deltas: str, sign: int) -> None:
    for pair in deltas.split(","):
        field, _, delta = pair.partition(":")
        if field in counted:
            counted[field] += sign * int(delta)


async def _recount(r: Redis, owner: str, pending: dict[str, str]) -> tuple[dict[str, int], list[BatchRecord]]:
    """What an owner's counters should be, from its records; and its ended, unreleased batches.

    active_batches and enqueued_lines: its batches not released yet (and their reserved_lines);
    stored_bytes: its file records, plus files whose record expired but whose bytes the sweep has
    not given back yet (their expiry entry is still there). ``pending`` (the owner's pending notes,
    read after its counters): a creation whose step 2 has not run counts what it reserved. A release
    or forget whose step 1 ran (the record released or gone) but whose deltas are not applied on
    the owner yet (in its shard's outbox, ``owner_op`` absent) counts as before it, unless the
    record was counted already (its step 1 came after the record was read).
    """
    counted = dict.fromkeys(USAGE_FIELDS, 0)
    unreleased: list[BatchRecord] = []
    seen: set[str] = set()  # ids whose record (or reservation) is in the recount
    F = BatchField
    fields = (
        F.STATUS,
        F.RELEASED,
        F.RESERVED_LINES,
        F.ID,
        F.OWNER,
        F.INPUT_FILE_ID,
        F.INPUT_KEY,
    )

    def count_batch(batch_id: str, values: list[bytes | None]) -> None:
        rec = BatchRecord.from_values(fields, values)
        if not rec.status or rec.released:
            return
        if rec.status in TERMINAL_STATUSES:
            unreleased.append(rec)
        counted["active_batches"] += 1
        counted["enqueued_lines"] += rec.reserved_lines
        seen.add(batch_id)

    def count_file(file_id: str, size: bytes | None) -> None:
        if size is not None:
            seen.add(file_id)
            counted["stored_bytes"] += int(size)

    # Pending creations: whether step 2 ran and the record, read at once (one slot, one MULTI).
    for object_id, note in pending.items():
        pipe = r.pipeline(transaction=True)
        pipe.get(keys.creation(object_id))
        if object_id.startswith("batch_"):
            pipe.hmget(keys.batch(object_id), *fields)
        else:
            pipe.hget(keys.file(object_id), FileField.BYTES)
        state, values = await pipe.execute()
        if state != b"created":  # not recorded yet, or given up but not given back yet: reserved
            _add(counted, note.split(" ")[1], 1)
            seen.add(object_id)
        elif object_id.startswith("batch_"):
            count_batch(object_id, values)
        else:
            count_file(object_id, values)

    batch_ids = [b.decode() for b in await r.zrange(keys.owner_batches(owner), 0, -1)]
    batch_ids = [b for b in batch_ids if b not in pending]
    for i in range(0, len(batch_ids), _CHUNK):
        chunk = batch_ids[i : i + _CHUNK]
        pipe = r.pipeline(transaction=False)
        for batch_id in chunk:
            pipe.hmget(keys.batch(batch_id), *fields)
        for batch_id, values in zip(chunk, await pipe.execute()):
            count_batch(batch_id, values)
    file_ids = [f.decode() for f in await r.zrange(keys.owner_files(owner), 0, -1)]
    file_ids = [f for f in file_ids if f not in pending]
    for i in range(0, len(file_ids), _CHUNK):
        chunk = file_ids[i : i + _CHUNK]
        pipe = r.pipeline(transaction=False)
        for file_id in chunk:
            pipe.hget(keys.file(file_id), FileField.BYTES)
        for file_id, size in zip(chunk, await pipe.execute()):
            count_file(file_id, size)

    # Per shard, at once: expiry entries, then the outbox (a forget moves an entry from the first to
    # the second in one step: read together, it is seen in one of them, never in both or neither).
    due = now() + _EXPIRY_SKEW_S
    unapplied: list[_Entry] = []
    for shard in range(keys.SHARDS):
        pipe = r.pipeline(transaction=True)
        pipe.zrangebyscore(keys.file_expiry(shard), "-inf", due)
        pipe.zrange(keys.outbox(shard), 0, -1)
        expiring, outbox = await pipe.execute()
        for member in expiring:
            file_id, _, entry_owner, size = member.decode().split(" ")
            if entry_owner == owner and file_id not in seen:
                seen.add(file_id)
                counted["stored_bytes"] += int(size)
        unapplied += [e for e in map(_Entry.parse, (m.decode() for m in outbox)) if e.owner == owner]
    if unapplied:
        applied = await r.mget([keys.owner_op(owner, e.op) for e in unapplied])
        for e, done in zip(unapplied, applied):
            if done is None and e.object_id not in seen:
                seen.add(e.object_id)
                _add(counted, e.deltas, -1)
    return counted, unreleased
