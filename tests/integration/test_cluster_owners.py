"""The owner <-> shard operations on a real Redis Cluster, through ``connect()``'s cluster client.

redis-py refuses a script or a MULTI whose keys span slots, so running the operations at all shows
each step is single-slot; the counters then show they stay exact: files and batches in shards of
every master, a result file fenced by its batch's finalizer lease, racing deletes, releases,
settling both ways, a release cut short and replayed, the expiry sweep, and the usage audit walking
the owner index (no repair: nothing drifted). The heartbeat's and the token store's MULTIs too.
"""

from __future__ import annotations

import asyncio

import pytest

from service.core import keys, leases, store, tokens
from service.core.config import Settings
from service.core.connections import connect
from service.core.heartbeat import Heartbeat
from service.core.records import BatchRecord, FileRecord
from service.core.storage import LocalStorage

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(300)]

OWNER = "c" * 32
FIELDS = ("active_batches", "enqueued_lines", "stored_bytes")
SHARDS = (0, 5, 6, 10, 11, 15)  # two shards of each master (5/6/5 slots split)


async def _usage(r) -> dict[str, int]:
    values = await r.hmget(keys.owner_usage(OWNER), *FIELDS)
    return {name: int(v or 0) for name, v in zip(FIELDS, values)}


async def test_owner_operations_are_exact_on_a_cluster(redis_cluster, tmp_path, monkeypatch):
    r = connect(Settings(redis_url=redis_cluster.url), max_connections=16)
    storage = LocalStorage(tmp_path)
    assert len({redis_cluster.master_of_key(keys.file_expiry(s)).port for s in SHARDS}) == 3
    try:
        files: list[FileRecord] = []
        batches: list[BatchRecord] = []
        for i, shard in enumerate(SHARDS):
            file_id, seq = await store.new_id(r, "file-", shard=shard)
            await storage.write(file_id, _chunks(b"x" * (100 + i)))
            await store.create_file(
                r,
                owner=OWNER,
                file_id=file_id,
                seq=seq,
                filename="in.jsonl",
                purpose="batch",
                size=100 + i,
                storage_key=file_id,
                expires_at=store.now() + 3600,
                max_stored_bytes=10_000,
            )
            files.append(FileRecord.from_hash(await r.hgetall(keys.file(file_id))))
            batch_id, seq = await store.new_id(r, "batch_", shard=shard)
            batches.append(
                await store.create_batch(
                    r,
                    owner=OWNER,
                    batch_id=batch_id,
                    seq=seq,
                    endpoint="/v1/chat/completions",
                    input_file_id=file_id,
                    input_key=file_id,
                    completion_window="24h",
                    window_s=86400,
                    metadata=None,
                    output_expires_after=None,
                    reserved_lines=3,
                    max_active_batches=len(SHARDS),
                    max_enqueued_lines=1000,
                )
            )
        stored = sum(f.bytes for f in files)
        assert await _usage(r) == {"active_batches": 6, "enqueued_lines": 18, "stored_bytes": stored}
        with pytest.raises(store.QuotaExceeded) as refused:
            await store.create_batch(r, **_batch_args(batches[0]), batch_id="batch_000000000099ffffffffffff")
        assert refused.value.field == "active_batches"
        assert await store.settle(r, OWNER, "batch_000000000099ffffffffffff") == "active_batches"
        assert await store.settle(r, OWNER, batches[0].id) == ""
        assert await store.settle(r, OWNER, "file-000000000098aaaaaaaaaaaa") is None  # never ran: never will

        # A result file, fenced by its batch's finalizer lease; then every batch ends.
        lease = await leases.take(r, keys.finalizer(batches[0].id), "fin-1", 10_000)
        assert lease is not None
        out_id, out_seq = await store.new_id(r, "file-", shard=keys.shard_of(batches[0].id))
        for _ in range(2):  # registered again after a retry: charged once
            await store.create_file(
                r,
                owner=OWNER,
                file_id=out_id,
                seq=out_seq,
                filename="out",
                purpose="batch_output",
                size=1000,
                storage_key="out",
                expires_at=store.now() + 3600,
                lease=lease,
            )
        stored += 1000
        # One release dies between its steps: the replay finishes it.
        real_apply = store._apply_entry

        async def dies(r_, shard, entry):
            raise ConnectionError("killed between the steps")

        monkeypatch.setattr(store, "_apply_entry", dies)
        await store.release(r, storage, batches[1])
        monkeypatch.setattr(store, "_apply_entry", real_apply)
        assert await _usage(r) == {"active_batches": 6, "enqueued_lines": 18, "stored_bytes": stored}
        assert await store.replay_outbox(r, keys.shard_of(batches[1].id), older_than_s=0) == 1
        for b in batches:
            await store.release(r, storage, b, lease=lease if b is batches[0] else None)
            await store.release(r, storage, b)
        assert await _usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": stored}

        # Racing deletes: exactly one wins per file, the bytes come back once.
        for f in files[:4]:
            answers = await asyncio.gather(*(store.delete_file(r, f, store.new_op_id()) for _ in range(8)))
            assert sorted(deleted for deleted, _ in answers) == [False] * 7 + [True]
            stored -= f.bytes
        assert (await _usage(r))["stored_bytes"] == stored
        # The expiry sweep, for one file due now.
        due = files[4]
        await r.zadd(keys.file_expiry(keys.shard_of(due.id)), {_member(due): 1})
        assert await store.sweep_expired_files(r, storage) == 1
        stored -= due.bytes
        assert await _usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": stored}
        assert await store.audit_usage(r, storage, "auditor") == 0
        assert await r.sismember(keys.OWNERS, OWNER)
        assert all([await r.zcard(keys.outbox(s)) == 0 for s in range(keys.SHARDS)])

        # The other single-slot MULTIs: a heartbeat's stop, a token's revocation.
        # (The beat itself still names the global metrics keys: another change moves them.)
        await r.hset(keys.process("web-cluster-1"), "role", "web")
        await Heartbeat(r, "web-cluster-1", "web").close()
        assert await r.exists(keys.process("web-cluster-1")) == 0
        await tokens.create(r, "cluster-token", None)
        assert await tokens.revoke(r, "cluster-token")
        assert await tokens.list_tokens(r) == []
    finally:
        await r.aclose()


def _member(f: FileRecord) -> str:
    return store.expiry_member(f.id, f.storage_key, f.owner, f.bytes)


async def _chunks(data: bytes):
    yield data


def _batch_args(b: BatchRecord) -> dict:
    return dict(
        owner=OWNER,
        seq=1,
        endpoint="/v1/chat/completions",
        input_file_id=b.input_file_id,
        input_key=b.input_key,
        completion_window="24h",
        window_s=86400,
        metadata=None,
        output_expires_after=None,
        reserved_lines=3,
        max_active_batches=len(SHARDS),
        max_enqueued_lines=1000,
    )
