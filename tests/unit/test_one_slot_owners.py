"""Every script of the owner <-> shard operations declares keys of one Redis Cluster slot.

On a cluster, redis-py refuses a script whose keys span slots before sending it; on fakeredis nothing
would notice. So every script call is checked here (``Script.run``/``enqueue`` wrapped) while the
operations run through their public functions: file and batch creation (with and without a lease),
settling both ways, delete, expiry sweep, release, the outbox replay and the usage audit with every
kind of half-done operation it meets. The real cluster runs the same paths in
tests/integration/test_cluster_owners.py.
"""

from __future__ import annotations

import fakeredis
import pytest

from service.core import connections, keys, leases, store
from service.core.records import FileRecord
from service.core.storage import LocalStorage
from service.devtools.shard_tags import key_slot

OWNER = "o" * 32


@pytest.fixture
def calls(monkeypatch):
    """Every script call as (first line of its body, declared keys); fails at once on a cross-slot call."""
    seen: list[tuple[str, list[str]]] = []
    run, enqueue = connections.Script.run, connections.Script.enqueue

    def check(script, script_keys) -> None:
        slots = {key_slot(k) for k in script_keys}
        assert len(slots) <= 1, f"keys of {len(slots)} slots: {list(script_keys)}\n{script.source[-400:]}"
        seen.append((script.sha, list(script_keys)))

    async def checked_run(self, r, script_keys, args):
        check(self, script_keys)
        return await run(self, r, script_keys, args)

    def checked_enqueue(self, pipe, script_keys, args):
        check(self, script_keys)
        return enqueue(self, pipe, script_keys, args)

    monkeypatch.setattr(connections.Script, "run", checked_run)
    monkeypatch.setattr(connections.Script, "enqueue", checked_enqueue)
    return seen


@pytest.fixture
async def r():
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


def fid(n: int, shard: int) -> str:
    return f"file-{n:012x}aaaaaaaaaaa{keys.shard_digit(shard)}"


def bid(n: int, shard: int) -> str:
    return f"batch_{n:012x}bbbbbbbbbbb{keys.shard_digit(shard)}"


async def new_file(r, file_id: str, size: int, **extra):
    return await store.create_file(
        r,
        owner=OWNER,
        file_id=file_id,
        seq=store.seq_of(file_id) or 1,
        filename="f.jsonl",
        purpose=extra.pop("purpose", "batch"),
        size=size,
        storage_key=file_id,
        expires_at=extra.pop("expires_at", None),
        max_stored_bytes=10_000,
        **extra,
    )


async def new_batch(r, batch_id: str, input_file_id: str, lines: int):
    return await store.create_batch(
        r,
        owner=OWNER,
        batch_id=batch_id,
        seq=store.seq_of(batch_id) or 1,
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        input_key=input_file_id,
        completion_window="24h",
        window_s=86400,
        metadata=None,
        output_expires_after=None,
        reserved_lines=lines,
        max_active_batches=5,
        max_enqueued_lines=100,
    )


async def test_every_owner_operation_stays_in_one_slot(r, calls, tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    for shard in (0, 7, 15):
        f = await new_file(r, fid(shard + 1, shard), 100 + shard, expires_at=store.now() + 3600)
        b = await new_batch(r, bid(shard + 1, shard), f.id, 3)
        # A result file, fenced by the batch's finalizer lease (same shard).
        lease = await leases.take(r, keys.finalizer(b.id), "fin", 10_000)
        await new_file(r, fid(shard + 100, shard), 50, purpose="batch_output", lease=lease)
        await r.hset(keys.batch(b.id), "status", "completed")
        await store.release(r, storage, b, lease=lease)
        await store.delete_file(r, FileRecord.from_hash(await r.hgetall(keys.file(f.id))), store.new_op_id())
    # Settled both ways: after its record was written, and before (given back).
    assert await store.settle(r, OWNER, fid(1, 0)) == ""
    await store._reserve(r, OWNER, fid(200, 3), 200, "batch", [("stored_bytes", 10, -1)])
    assert await store.settle(r, OWNER, fid(200, 3)) is None
    # The expiry sweep and the outbox replay, with an entry left by a process that died.
    await new_file(r, fid(300, 5), 30, expires_at=store.now() + 3600)
    await r.zadd(keys.file_expiry(5), {store.expiry_member(fid(300, 5), fid(300, 5), OWNER, 30): 1})
    real_apply = store._apply_entry

    async def dies(r_, shard, entry):
        raise ConnectionError("died between the steps")

    monkeypatch.setattr(store, "_apply_entry", dies)
    assert await store.sweep_expired_files(r, storage) == 1
    monkeypatch.setattr(store, "_apply_entry", real_apply)
    assert await store.replay_outbox(r, 5, older_than_s=0) == 1
    # The audit meets a stale pending creation and drift.
    await store._reserve(r, OWNER, bid(400, 9), 400, "-", [("active_batches", 1, 5)])
    await r.hset(keys.owner_pending(OWNER), bid(400, 9), "1 active_batches:1 -")
    await r.hincrby(keys.owner_usage(OWNER), "stored_bytes", 7)
    assert await store.audit_usage(r, storage, "auditor") == 1
    assert len({sha for sha, _ in calls}) >= 12, "fewer scripts ran than the operations use"
