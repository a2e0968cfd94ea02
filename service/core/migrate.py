"""Moving a deployment's Redis data from the layout before the shards to the sharded one (``sluice migrate-keys``).

Offline: every Sluice process is stopped. Each old key is moved by one script that acts only if the
old key still exists and deletes it in the same atomic step (a rename, or a merge into a key that
already exists), so the migration may be killed at any point and run again, and a re-sent call after
a lost reply changes nothing: nothing is counted twice, nothing is lost. Owners are added to
``keys.OWNERS`` before their keys move, so a run killed after a move still knows the owner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .connections import Pipeline, Redis, Script, run_scripts

# A process whose heartbeat is this recent is taken for one still running.
RECENT_S = 60
# Script calls per pipeline: few round trips, no long stall of Redis.
_CHUNK = 200

# Merge modes of a move into a key that already exists.
KEEP = "keep"  # the destination's values win (records, lists, op answers)
SUM = "sum"  # hashes of counters: each field added
SUM_PERSIST = "sum-persist"  # counters that never expire in the sharded layout (keys.metrics_*)
BITMAP = "bitmap"  # bits OR-ed (a batch's done bitmap)

# 0: the old key is gone (moved by an earlier run); 1: renamed; 2: merged; -1: both are streams (or
# lists), which cannot be merged: the old key is left for the operator. A merge keeps the later of the
# two TTLs where both have one; a destination without one keeps none.
_MOVE = Script(
    keys=("old", "new"),
    args=("mode",),
    source="""
if redis.call('EXISTS', KEYS.old) == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS.old)
local dttl = redis.call('PTTL', KEYS.new)
local answer = 1
if dttl == -2 then
  redis.call('RENAME', KEYS.old, KEYS.new)
else
  local kind = redis.call('TYPE', KEYS.old)['ok']
  if kind ~= redis.call('TYPE', KEYS.new)['ok'] or kind == 'stream' or kind == 'list' then return -1 end
  local sum = ARGV.mode == 'sum' or ARGV.mode == 'sum-persist'
  if kind == 'hash' then
    local h = redis.call('HGETALL', KEYS.old)
    for i = 1, #h, 2 do
      local f, v = h[i], h[i + 1]
      if sum and string.match(v, '^%-?%d+$') then
        redis.call('HINCRBY', KEYS.new, f, v)
      elseif sum and tonumber(v) then
        redis.call('HINCRBYFLOAT', KEYS.new, f, v)
      else
        redis.call('HSETNX', KEYS.new, f, v)
      end
    end
  elseif kind == 'set' then
    redis.call('SUNIONSTORE', KEYS.new, KEYS.new, KEYS.old)
  elseif kind == 'zset' then
    redis.call('ZUNIONSTORE', KEYS.new, 2, KEYS.new, KEYS.old, 'AGGREGATE', 'MAX')
  elseif kind == 'string' and ARGV.mode == 'bitmap' then
    redis.call('BITOP', 'OR', KEYS.new, KEYS.new, KEYS.old)
  end
  -- SUNIONSTORE, ZUNIONSTORE and BITOP store a new key: give the destination its TTL back.
  if dttl > 0 then redis.call('PEXPIRE', KEYS.new, math.max(dttl, ttl)) end
  redis.call('DEL', KEYS.old)
  answer = 2
end
if ARGV.mode == 'sum-persist' then redis.call('PERSIST', KEYS.new) end
return answer
""",
)

# Moves the members given (``member``, shard pairs: the shard indexes ``dests``) that are still in
# the old set or sorted set, with their scores; returns how many moved. The old key vanishes with its
# last member.
_SPLIT = Script(
    keys=("old", "*dests"),
    args=("*moves",),
    source="""
local kind = redis.call('TYPE', KEYS.old)['ok']
local moved = 0
for i = 1, #ARGV, 2 do
  local m, dest = ARGV[i], KEYS[tonumber(ARGV[i + 1]) + 2]
  if kind == 'zset' then
    local score = redis.call('ZSCORE', KEYS.old, m)
    if score then
      redis.call('ZADD', dest, score, m)
      redis.call('ZREM', KEYS.old, m)
      moved = moved + 1
    end
  elseif kind == 'set' then
    if redis.call('SREM', KEYS.old, m) == 1 then
      redis.call('SADD', dest, m)
      moved = moved + 1
    end
  end
end
return moved
""",
)

# Every new fencing counter goes to at least the old global one, which then goes: tokens keep growing.
_LEASE_SEQ = Script(
    keys=("old", "*counters"),
    source="""
local v = tonumber(redis.call('GET', KEYS.old))
if not v then return 0 end
for i = 2, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < v then redis.call('SET', KEYS[i], string.format('%d', v)) end
end
redis.call('DEL', KEYS.old)
return v
""",
)
# Up to ``n`` members of a set or sorted set (any: the caller moves them out before asking again).
_SOME_MEMBERS = Script(
    keys=("old",),
    args=("n",),
    source="""
local kind = redis.call('TYPE', KEYS.old)['ok']
if kind == 'zset' then return redis.call('ZRANGE', KEYS.old, 0, tonumber(ARGV.n) - 1) end
if kind == 'set' then return redis.call('SRANDMEMBER', KEYS.old, ARGV.n) end
return {}
""",
)

# Names in the heartbeat sets whose last beat (Redis time, s) is less than ``recent_s`` old.
_RECENT = Script(
    keys=("*processes",),
    args=("recent_s",),
    source="""
local now = tonumber(redis.call('TIME')[1])
local names = {}
for _, k in ipairs(KEYS) do
  if redis.call('TYPE', k)['ok'] == 'zset' then
    for _, n in ipairs(redis.call('ZRANGEBYSCORE', k, now - tonumber(ARGV.recent_s), '+inf')) do
      names[#names + 1] = n
    end
  end
end
return names
""",
)
_SCRIPTS = (_MOVE, _SPLIT, _LEASE_SEQ, _SOME_MEMBERS)


@dataclass(frozen=True)
class Move:
    """One old key and where it goes: ``new`` (a key), or the per-shard ``split`` of a global set."""

    old: str
    what: str
    new: str = ""
    mode: str = KEEP
    split: Callable[[int], str] | None = None


@dataclass
class Plan:
    """Every old key found, by what the migration does with it."""

    moves: list[Move] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    owners: set[str] = field(default_factory=set)
    lease_seq: bool = False

    def empty(self) -> bool:
        """True when there is nothing left to move or delete."""
        return not (self.moves or self.deletes or self.lease_seq)


@dataclass
class Report:
    """What a run did: moves by kind and outcome, deletions, conflicts left for the operator."""

    moved: Counter[str] = field(default_factory=Counter)
    merged: Counter[str] = field(default_factory=Counter)
    members: int = 0
    deleted: int = 0
    owners: int = 0
    lease_seq: int = 0
    conflicts: list[str] = field(default_factory=list)


def lease_counters() -> list[str]:
    """Every fencing counter (``keys.lease_seq``) the sharded layout's leases may draw from."""
    leases = [keys.USAGE_AUDIT_LOCK]
    for shard in range(keys.SHARDS):
        some_batch = f"batch_{keys.shard_digit(shard)}"
        leases += [keys.housekeeping("sweep", shard), keys.housekeeping("webhooks", shard)]
        leases += [keys.validator(some_batch), keys.feeder(some_batch), keys.finalizer(some_batch)]
        leases.append(keys.part_lease(some_batch, 0))
    return sorted({keys.lease_seq(lease) for lease in leases})


def _batch_move(key: str, batch_id: str, what: str) -> Move | None:
    if what == "batch":
        return Move(key, "batch", keys.batch(batch_id))
    if what in ("lines", "results"):
        return Move(key, what, (keys.lines if what == "lines" else keys.results)(batch_id))
    if what == "done":
        return Move(key, "done", keys.done(batch_id), BITMAP)
    if what == "deleg":
        return Move(key, "delegation", keys.delegation(batch_id))
    return None  # a lease: transient


def classify(key: str, plan: Plan) -> None:
    """Add what happens to ``key`` to ``plan`` (keys of the sharded layout are skipped)."""
    if key in keys.LEGACY_SHARDED_SETS:
        plan.moves.append(Move(key, "index", split=keys.LEGACY_SHARDED_SETS[key]))
    elif key in keys.LEGACY_METRICS:
        plan.moves.append(Move(key, "metrics", keys.LEGACY_METRICS[key](0), SUM_PERSIST))
    elif key in keys.LEGACY_TOKENS:
        plan.moves.append(Move(key, "tokens", keys.LEGACY_TOKENS[key]))
    elif key == keys.LEGACY_LEASE_SEQ:
        plan.lease_seq = True
    elif key in keys.LEGACY_KEPT or keys.LEGACY_HISTORY.match(key):
        plan.kept.append(key)
    elif (
        key in keys.LEGACY_TRANSIENT
        or keys.LEGACY_PROCESS.match(key)
        or keys.LEGACY_CHORE_LEASE.match(key)
        or keys.LEGACY_PROVIDER.match(key)
    ):
        plan.deletes.append(key)
    elif m := keys.LEGACY_USAGE_DAY.match(key):
        plan.moves.append(Move(key, "usage_day", keys.usage_day(0, m["day"]), SUM))
    elif m := keys.LEGACY_FILE.match(key):
        new = {None: keys.file, "refs": keys.file_refs, "deleted": keys.file_tombstone}[m["what"]](m["id"])
        plan.moves.append(Move(key, f"file:{m['what'] or 'record'}", new))
    elif m := keys.LEGACY_OWNER.match(key):
        owner, what = m["owner"], m["what"]
        plan.owners.add(owner)
        if what == "usage":
            plan.moves.append(Move(key, "owner:usage", keys.owner_usage(owner), SUM))
        elif what == "batches":
            plan.moves.append(Move(key, "owner:batches", keys.owner_batches(owner)))
        elif m["op"] is not None:
            plan.moves.append(Move(key, "owner:op", keys.owner_op(owner, m["op"])))
        else:
            plan.moves.append(Move(key, "owner:files", keys.owner_files(owner, m["purpose"])))
    elif m := keys.LEGACY_BATCH.match(key):
        move = _batch_move(key, m["id"], m["what"])
        if move is None:
            plan.deletes.append(key)
        else:
            plan.moves.append(move)
    elif "{" not in key:
        plan.unknown.append(key)


async def plan(r: Redis) -> Plan:
    """Every old key in Redis, classified (reads only)."""
    found = Plan()
    async for raw in r.scan_iter(match=keys.LEGACY_PATTERN, count=1000):
        classify(raw.decode() if isinstance(raw, bytes) else raw, found)
    return found


async def legacy_layout_found(r: Redis) -> bool:
    """Whether this Redis still holds data under the names of the layout before the shards.

    One EXISTS over the old global keys (every deployment that ran has some: the batch and file
    indexes, the counters, the managed tokens), so a process can say at start-up that
    ``sluice migrate-keys`` is due, where the new names would show an empty deployment.
    """
    return bool(await r.exists(*keys.LEGACY_SHARDED_SETS, *keys.LEGACY_METRICS, *keys.LEGACY_TOKENS))


async def recent_processes(r: Redis) -> list[str]:
    """Names of the processes (either layout's heartbeats) seen in the last ``RECENT_S`` seconds."""
    names = await _RECENT(r, processes=[keys.LEGACY_PROCESSES, keys.PROCESSES], recent_s=RECENT_S)
    return sorted({n.decode() for n in names})


async def _run_pipeline(r: Redis, build: Callable[[Pipeline], None]) -> list[Any]:
    # Every call is safe to run twice (run_scripts may send them again).
    return await run_scripts(r, build, _SCRIPTS)


def _chunks(items: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


async def _split(r: Redis, move: Move, report: Report) -> None:
    assert move.split is not None
    dests = [move.split(s) for s in range(keys.SHARDS)]
    while members := [m.decode() for m in await _SOME_MEMBERS(r, old=move.old, n=500)]:
        flat: list[str | int] = []
        for m in members:
            flat += [m, keys.shard_of(m.split(" ", 1)[0])]
        report.members += int(await _SPLIT(r, old=move.old, dests=dests, moves=flat))


async def migrate(r: Redis, found: Plan) -> Report:
    """Carry out ``found`` (see the module's docstring); safe to run again, in whole or after a kill."""
    report = Report()
    for script in _SCRIPTS:
        await script.load(r)
    owners = sorted(found.owners)
    for chunk in _chunks(owners, 1000):
        report.owners += int(await r.sadd(keys.OWNERS, *chunk))
    if found.lease_seq:
        report.lease_seq = int(await _LEASE_SEQ(r, old=keys.LEGACY_LEASE_SEQ, counters=lease_counters()))
    plain = [m for m in found.moves if m.split is None]
    for chunk in _chunks(plain):

        def build(pipe: Pipeline, chunk: Sequence[Move] = chunk) -> None:
            for m in chunk:
                _MOVE.queue(pipe, old=m.old, new=m.new, mode=m.mode)

        for m, answer in zip(chunk, await _run_pipeline(r, build)):
            if answer == 1:
                report.moved[m.what] += 1
            elif answer == 2:
                report.merged[m.what] += 1
            elif answer == -1:
                report.conflicts.append(f"{m.old} -> {m.new}")
    for m in found.moves:
        if m.split is not None:
            await _split(r, m, report)
    for keys_chunk in _chunks(found.deletes, 1000):

        def drop(pipe: Pipeline, chunk: Sequence[str] = keys_chunk) -> None:
            pipe.delete(*chunk)

        report.deleted += sum(int(n) for n in await _run_pipeline(r, drop))
    return report


def describe(found: Plan) -> list[str]:
    """One line per action of ``found`` (what ``--dry-run`` prints)."""
    out: list[str] = []
    if found.owners:
        out.append(f"add {len(found.owners)} owner(s) to {keys.OWNERS}")
    if found.lease_seq:
        out.append(f"raise {len(lease_counters())} fencing counters to {keys.LEGACY_LEASE_SEQ}, then delete it")
    for m in found.moves:
        if m.split is not None:
            out.append(f"split {m.old} by shard -> {m.split(0).replace(keys.SHARD_TAGS[0], '<shard>')}")
        else:
            how = {KEEP: "move", SUM: "add", SUM_PERSIST: "add", BITMAP: "move"}[m.mode]
            out.append(f"{how} {m.old} -> {m.new}")
    out += [f"delete {k}" for k in found.deletes]
    out += [f"keep {k}" for k in found.kept]
    out += [f"unknown, left as is: {k}" for k in found.unknown]
    return out
