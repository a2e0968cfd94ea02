"""The owner <-> shard operations stay exact when a process dies or stalls between their steps.

A release or forget that won on its shard but died before its owner-side step leaves an outbox
entry: ``replay_outbox`` applies it once, however often it runs and whoever else finishes it. A
creation reserved on the owner but not recorded counts as reserved for the audit, is hidden from
listings without being pruned, and once stale is settled by the audit (given back, and its late
second step refused). On fakeredis (with Lua).
"""

from __future__ import annotations

import fakeredis
import pytest

from service.core import keys, store
from service.core.records import BatchRecord, FileRecord
from service.core.storage import LocalStorage

OWNER = "o" * 32
FIELDS = ("active_batches", "enqueued_lines", "stored_bytes")


@pytest.fixture
async def r():
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path)


@pytest.fixture
def logs(monkeypatch):
    import structlog
    from structlog.testing import capture_logs

    with capture_logs() as captured:
        monkeypatch.setattr(store, "log", structlog.get_logger("sluice.store"))
        yield captured


async def usage(r) -> dict[str, int]:
    values = await r.hmget(keys.owner_usage(OWNER), *FIELDS)
    return {name: int(v or 0) for name, v in zip(FIELDS, values)}


def fid(n: int) -> str:
    return f"file-{n:012x}aaaaaaaaaaa3"


def bid(n: int) -> str:
    return f"batch_{n:012x}bbbbbbbbbbb3"


async def new_file(r, file_id: str, size: int):
    return await store.create_file(
        r,
        owner=OWNER,
        file_id=file_id,
        seq=store.seq_of(file_id) or 1,
        filename="f.jsonl",
        purpose="batch",
        size=size,
        storage_key=file_id,
        expires_at=None,
        max_stored_bytes=10_000,
    )


async def new_batch(r, batch_id: str, lines: int):
    return await store.create_batch(
        r,
        owner=OWNER,
        batch_id=batch_id,
        seq=store.seq_of(batch_id) or 1,
        endpoint="/v1/chat/completions",
        input_file_id=fid(999),
        input_key="k",
        completion_window="24h",
        window_s=86400,
        metadata=None,
        output_expires_after=None,
        reserved_lines=lines,
        max_active_batches=3,
        max_enqueued_lines=100,
    )


@pytest.fixture
def dies_after_step_1(monkeypatch):
    """The process dies right after the shard-side step of a release or forget."""
    real = store._apply_entry

    async def dead(r_, shard, entry):
        raise ConnectionError("killed between the steps")

    monkeypatch.setattr(store, "_apply_entry", dead)
    yield
    monkeypatch.setattr(store, "_apply_entry", real)


async def _outbox(r) -> list[bytes]:
    return await r.zrange(keys.outbox(3), 0, -1)


async def test_a_forget_cut_short_is_replayed_once(r, storage, dies_after_step_1, monkeypatch, logs):
    await new_file(r, fid(1), 700)
    await new_file(r, fid(2), 300)
    h = FileRecord.from_hash(await r.hgetall(keys.file(fid(1))))
    assert (await store.delete_file(r, h, "op-1"))[0]
    assert await r.exists(keys.file(fid(1))) == 0
    assert (await usage(r))["stored_bytes"] == 1000, "the owner's step ran"
    assert len(await _outbox(r)) == 1
    assert await store.replay_outbox(r, 3) == 0, "a fresh entry belongs to a call still under way"
    monkeypatch.undo()
    assert await store.replay_outbox(r, 3, older_than_s=0) == 1
    assert await store.replay_outbox(r, 3, older_than_s=0) == 0
    assert (await usage(r))["stored_bytes"] == 300
    assert await r.zrange(keys.owner_files(OWNER), 0, -1) == [fid(2).encode()]
    # The delete re-sent after its reply was lost, late: still "deleted", nothing more given back.
    assert (await store.delete_file(r, h, "op-1"))[0]
    assert (await usage(r))["stored_bytes"] == 300
    assert await _outbox(r) == []
    assert [e["entry"].split(" ")[0] for e in logs if e["event"] == "outbox_replayed"] == ["op-1"]


async def test_a_release_cut_short_is_finished_by_the_next_release_or_the_replay(
    r, storage, dies_after_step_1, monkeypatch
):
    h = await new_batch(r, bid(1), 4)
    await new_batch(r, bid(2), 5)
    await store.release(r, storage, h)
    assert await r.hget(keys.batch(bid(1)), "released") == b"1"
    assert await usage(r) == {"active_batches": 2, "enqueued_lines": 9, "stored_bytes": 0}
    monkeypatch.undo()
    # Any later release of the same batch (the finalizer's next tick, the audit) finishes it, once.
    await store.release(r, storage, h)
    await store.release(r, storage, h)
    assert await store.replay_outbox(r, 3, older_than_s=0) == 0
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 5, "stored_bytes": 0}
    assert await _outbox(r) == []


async def test_an_entry_older_than_the_op_keys_is_left_to_the_audit(r, storage, dies_after_step_1, monkeypatch, logs):
    h = await new_batch(r, bid(1), 4)
    await store.release(r, storage, h)
    monkeypatch.undo()
    (entry,) = await _outbox(r)
    await r.zadd(keys.outbox(3), {entry: 1})  # a day and more ago
    assert await store.replay_outbox(r, 3) == 0
    assert await _outbox(r) == []
    events = [e["event"] for e in logs]
    assert "outbox_entry_abandoned" in events and "outbox_replayed" not in events
    assert await store.audit_usage(r, storage, "auditor") == 1
    assert await usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}


async def test_the_audit_leaves_half_done_operations_alone(r, storage, dies_after_step_1, logs):
    """Reserved but not recorded, released or forgotten but not applied on the owner: no repair."""
    await new_file(r, fid(1), 700)
    await new_file(r, fid(2), 300)
    h = await new_batch(r, bid(1), 4)
    await new_batch(r, bid(2), 2)
    await store._reserve(r, OWNER, fid(3), 3, "batch", [("stored_bytes", 50, -1)])  # step 2 not run yet
    await store.delete_file(r, FileRecord.from_hash(await r.hgetall(keys.file(fid(1)))), "op-del")
    await r.hset(keys.batch(bid(1)), "status", "completed")
    await store.release(r, storage, BatchRecord.from_hash(await r.hgetall(keys.batch(h.id))))
    before = await usage(r)
    assert before == {"active_batches": 2, "enqueued_lines": 6, "stored_bytes": 1050}
    assert await store.audit_usage(r, storage, "auditor") == 0
    assert await usage(r) == before
    assert not [e for e in logs if e["event"] in ("usage_repaired", "creation_settled")]


async def test_a_stale_reservation_is_given_back_by_the_audit_and_its_late_record_refused(r, storage, logs):
    await new_file(r, fid(1), 700)
    await store._reserve(r, OWNER, fid(2), 2, "batch", [("stored_bytes", 300, 10_000)])  # then the web died
    assert (await usage(r))["stored_bytes"] == 1000
    assert await store.audit_usage(r, storage, "auditor") == 0  # young: under way, left alone
    await r.hset(keys.owner_pending(OWNER), fid(2), "1 stored_bytes:300 batch")  # PENDING_STALE_S later
    assert await store.audit_usage(r, storage, "auditor") == 0
    assert (await usage(r))["stored_bytes"] == 700
    assert [e["id"] for e in logs if e["event"] == "creation_settled"] == [fid(2)]
    assert await r.zrange(keys.owner_files(OWNER, "batch"), 0, -1) == [fid(1).encode()]
    assert await r.hlen(keys.owner_pending(OWNER)) == 0
    with pytest.raises(store.Aborted):  # the web process resumes: its call finds it settled
        await new_file(r, fid(2), 300)
    assert await r.exists(keys.file(fid(2))) == 0
    assert (await usage(r))["stored_bytes"] == 700


async def test_a_creation_under_way_is_not_listed_nor_pruned(r):
    await new_file(r, fid(1), 10)
    await store._reserve(r, OWNER, fid(2), 2, "batch", [("stored_bytes", 20, -1)])
    await new_file(r, fid(3), 30)

    async def listed(limit: int) -> tuple[list[str], bool]:
        records, more = await store.page(
            r,
            keys.owner_files(OWNER),
            keys.file,
            FileRecord.from_hash,
            after=None,
            limit=limit,
            desc=True,
            pending=keys.owner_pending(OWNER),
        )
        return [rec.id for rec in records], more

    assert await listed(10) == ([fid(3), fid(1)], False)
    assert await listed(1) == ([fid(3)], True)
    assert await r.zscore(keys.owner_files(OWNER), fid(2)) is not None, "pruned while under way"
    await new_file(r, fid(2), 20)  # its call goes on: the record is written
    assert await listed(10) == ([fid(3), fid(2), fid(1)], False)
    await r.delete(keys.file(fid(1)))  # expired: pruned on the way
    assert await listed(10) == ([fid(3), fid(2)], False)
    assert await r.zscore(keys.owner_files(OWNER), fid(1)) is None


async def test_a_result_file_given_up_by_the_audit_gets_a_new_id(r, tmp_path):
    """A stale finalizer's charge for a result file was settled away: its successor draws another id."""
    from service.core import leases
    from service.core.config import Settings
    from workers.finalizer import Finalizer

    fin = Finalizer(Settings(data_dir=tmp_path), LocalStorage(tmp_path))
    fin.redis = r
    h = await new_batch(r, bid(1), 1)
    given_up = fid(50)
    await r.hset(
        keys.batch(bid(1)), mapping={"fin_out_lines": 1, "fin_out_bytes": 40, "fin_out_file": f"{given_up}:50"}
    )
    await store._reserve(r, OWNER, given_up, 50, "batch_output", [("stored_bytes", 40, -1)])
    assert await store.settle(r, OWNER, given_up) is None  # what the audit does with it after PENDING_STALE_S
    lease = await leases.take(r, keys.finalizer(bid(1)), fin.name, 10_000)
    h = BatchRecord.from_hash(await r.hgetall(keys.batch(bid(1))))
    file_id = await fin._register_file(h, "out", lease)
    assert file_id and file_id != given_up and keys.shard_of(file_id) == keys.shard_of(bid(1))
    assert (await r.hget(keys.batch(bid(1)), "fin_out_file")).decode().startswith(file_id + ":")
    assert await r.exists(keys.file(file_id)) == 1
    assert (await usage(r))["stored_bytes"] == 40
