"""``service.core.migrate`` on fakeredis: an old-layout data set built by hand from the old key names.

Moves, merges into keys that already exist, TTLs, fencing counters, running twice and running again
after a run cut short give the same end state, with nothing counted twice.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from service.core import keys, migrate
from service.core.connections import Redis

OWNER = "0123456789abcdef0123456789abcdef"
FILE = "file-00000000000100000000000a"
BATCH = "batch_00000000000200000000000b"
OTHER = "batch_000000000003000000000003"


async def _old_layout(r: Any) -> None:
    await r.hset(f"sluice:file:{FILE}", mapping={"id": FILE, "owner": OWNER, "bytes": 70})
    await r.sadd(f"sluice:file:{FILE}:refs", BATCH)
    await r.hset(f"sluice:{{{BATCH}}}:batch", mapping={"id": BATCH, "owner": OWNER, "status": "in_progress"})
    await r.xadd(f"sluice:{{{BATCH}}}:lines", {"n": "0"})
    await r.xgroup_create(f"sluice:{{{BATCH}}}:lines", keys.WORKER_GROUP, id="0")
    await r.setbit(f"sluice:{{{BATCH}}}:done", 3, 1)
    await r.set(f"sluice:{{{BATCH}}}:finalizer", "7 fin-1", px=60_000)
    await r.hset(f"sluice:owner:{OWNER}:usage", mapping={"active_batches": 1, "stored_bytes": 70, "rev": 4})
    await r.zadd(f"sluice:owner:{OWNER}:files", {FILE: 1})
    await r.zadd(f"sluice:owner:{OWNER}:files:batch", {FILE: 1})
    await r.zadd(f"sluice:owner:{OWNER}:batches", {BATCH: 2})
    await r.set(f"sluice:owner:{OWNER}:op:{BATCH}", "", ex=3600)
    await r.sadd("sluice:batches:active", BATCH, OTHER)
    await r.sadd("sluice:batches:live", BATCH)
    await r.zadd("sluice:batches:validating", {OTHER: 5})
    await r.zadd("sluice:files:expiry", {f"{FILE} st/{FILE} {OWNER} 70": 1234})
    await r.hset("sluice:tokens", "digest", "{}")
    await r.hset("sluice:tokens:names", "kept", "digest")
    await r.set("sluice:seq:leases", 41)
    await r.set("sluice:seq", 3)
    await r.hset("sluice:metrics:lines", mapping={"completed": 5, "failed": 1})
    await r.expire("sluice:metrics:lines", 86400)
    await r.hset("sluice:metrics:latency", mapping={"p|200|count": 6, "p|200|sum": "1.5"})
    await r.hset("sluice:usage:2025-01-02", f"{OWNER}|p|m|input", 100)
    await r.expire("sluice:usage:2025-01-02", 1000)
    await r.hset("sluice:history:1735776000", "completed", 5)
    await r.zadd("sluice:processes", {"web-1": 1})
    await r.hset("sluice:process:web-1", "role", "web")
    await r.set("sluice:lease:sweep", "3 fin-1")
    await r.hset("sluice:provider:p:bucket", "t", 1)


@pytest.fixture
async def r() -> Any:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


async def _dump(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted(await r.keys("*")):
        kind = (await r.type(k)).decode()
        if kind == "hash":
            out[k.decode()] = await r.hgetall(k)
        elif kind == "set":
            out[k.decode()] = await r.smembers(k)
        elif kind == "zset":
            out[k.decode()] = await r.zrange(k, 0, -1, withscores=True)
        elif kind == "string":
            out[k.decode()] = await r.get(k)
        else:
            out[k.decode()] = kind
    return out


async def _migrate(r: Any) -> migrate.Report:
    client: Redis = r
    return await migrate.migrate(client, await migrate.plan(client))


async def test_every_old_key_moves_to_the_sharded_layout(r: Any) -> None:
    assert not await migrate.legacy_layout_found(r)
    await _old_layout(r)
    assert await migrate.legacy_layout_found(r), "a web process would not warn that a migration is due"
    await r.hset(keys.metrics_lines(0), "completed", 2)  # the new version already counted here
    report = await _migrate(r)
    assert not report.conflicts
    left = sorted(k.decode() for k in await r.keys("sluice:*") if b"{" not in k)
    assert left == ["sluice:history:1735776000", "sluice:seq"]
    assert not await migrate.legacy_layout_found(r)
    assert (await r.hgetall(keys.file(FILE)))[b"owner"] == OWNER.encode()
    assert await r.smembers(keys.file_refs(FILE)) == {BATCH.encode()}
    assert (await r.xinfo_groups(keys.lines(BATCH)))[0]["name"] == keys.WORKER_GROUP.encode()
    assert await r.getbit(keys.done(BATCH), 3) == 1
    assert not await r.exists(keys.finalizer(BATCH))
    assert await r.smembers(keys.active_batches(keys.shard_of(BATCH))) == {BATCH.encode()}
    assert await r.smembers(keys.active_batches(keys.shard_of(OTHER))) == {OTHER.encode()}
    assert await r.zscore(keys.pending_validation(keys.shard_of(OTHER)), OTHER) == 5
    assert await r.zcard(keys.file_expiry(keys.shard_of(FILE))) == 1
    assert await r.smembers(keys.OWNERS) == {OWNER.encode()}
    assert (await r.hgetall(keys.owner_usage(OWNER)))[b"stored_bytes"] == b"70"
    assert await r.zrange(keys.owner_files(OWNER, "batch"), 0, -1) == [FILE.encode()]
    assert 0 < await r.ttl(keys.owner_op(OWNER, BATCH)) <= 3600
    assert await r.hget(keys.TOKEN_NAMES, "kept") == b"digest"
    assert await r.hget(keys.metrics_lines(0), "completed") == b"7"
    assert await r.ttl(keys.metrics_lines(0)) == -1  # counters of the sharded layout never expire
    assert await r.hget(keys.metrics_latency(0), "p|200|sum") == b"1.5"
    day = keys.usage_day(0, "2025-01-02")
    assert await r.hget(day, f"{OWNER}|p|m|input") == b"100" and 0 < await r.ttl(day) <= 1000
    counters = migrate.lease_counters()
    assert keys.lease_seq(keys.USAGE_AUDIT_LOCK) in counters and len(counters) == keys.SHARDS + 1
    assert [int(await r.get(c)) for c in counters] == [41] * len(counters)


async def test_running_twice_or_after_a_cut_short_run_ends_the_same(r: Any) -> None:
    await _old_layout(r)
    await _migrate(r)
    once = await _dump(r)
    again = await _migrate(r)
    assert await _dump(r) == once and not again.moved and not again.merged

    await r.flushall()
    await _old_layout(r)
    client: Redis = r
    found = await migrate.plan(client)
    # A run killed halfway: half of the moves done, the rest not started; then a whole run.
    half = migrate.Plan(moves=found.moves[: len(found.moves) // 2], owners=found.owners)
    await migrate.migrate(client, half)
    await _migrate(r)
    assert await _dump(r) == once


async def test_the_dry_run_and_the_refusal_change_nothing(r: Any) -> None:
    from service.cli.migrate import _run

    await _old_layout(r)
    now = (await r.time())[0]
    await r.zadd("sluice:processes", {"worker-9": now - 5})
    before = await _dump(r)
    assert await _run(r, force=False, dry_run=False) == 2
    assert await _run(r, force=True, dry_run=True) == 0
    assert await _dump(r) == before
    assert await migrate.recent_processes(r) == ["worker-9"]
    assert await _run(r, force=True, dry_run=False) == 0
