"""File deletes are exact: racing deletes, a delete re-sent after a lost reply, and the expiry sweep
give a file's bytes back once (fakeredis; the real-process race is in tests/integration/test_edge.py)."""

from __future__ import annotations

import asyncio

import msgspec

from service.core import keys, store
from service.core.records import FileRecord
from service.web.appkeys import REDIS as REDIS_KEY

from .conftest import good_jsonl

OWNER_A = store.owner_of("tok-a")


def _expiry(file_id: str) -> str:
    return keys.file_expiry(keys.shard_of(file_id))


def redis_of(api):
    return api.client.app[REDIS_KEY]


async def _stored_bytes(api) -> int:
    return await store.usage(redis_of(api), OWNER_A, "stored_bytes")


def _expiry(file_id: str) -> str:
    return keys.file_expiry(keys.shard_of(file_id))


async def _expiring(r) -> int:
    """Entries in every shard's expiry index."""
    return sum([await r.zcard(keys.file_expiry(shard)) for shard in range(keys.SHARDS)])


async def _record(api, file_id: str) -> FileRecord:
    h = await store.get_file_record(redis_of(api), OWNER_A, file_id)
    assert h is not None
    return h


async def test_lost_reply_rerun_of_the_delete_answers_deleted_again(api):
    f = await api.upload_ok(good_jsonl(3))
    before = await _stored_bytes(api)
    h = await _record(api, f["id"])
    r = redis_of(api)
    marker = store.content_marker(f["id"], h.storage_key, OWNER_A)
    # redis-py re-sends the same call (same op id) when the reply of the first run was lost.
    assert await store.delete_file(r, h, "op-1") == (True, marker)
    assert await store.delete_file(r, h, "op-1") == (True, marker)
    assert await _stored_bytes(api) == before - f["bytes"]
    # Any other delete of the same file finds it gone.
    assert await store.delete_file(r, h, "op-2") == (False, None)
    assert await _stored_bytes(api) == before - f["bytes"]
    assert await r.exists(keys.file(f["id"])) == 0
    assert await r.zscore(keys.owner_files(OWNER_A), f["id"]) is None
    assert await r.zscore(keys.owner_files(OWNER_A, "batch"), f["id"]) is None
    # Its expiry entry is gone; only the marker of its content is left, due after the tombstone.
    assert await r.zrange(_expiry(f["id"]), 0, -1) == [marker.encode()]
    assert await r.zscore(_expiry(f["id"]), marker) > store.now() + store.FILE_TOMBSTONE_S
    # The tombstone that makes the re-run exact is short-lived.
    assert 0 < await r.ttl(keys.file_tombstone(f["id"])) <= store.FILE_TOMBSTONE_S


async def test_concurrent_deletes_exactly_one_200(api):
    files = [await api.upload_ok(good_jsonl(2), filename=f"f{i}.jsonl") for i in range(3)]
    before = await _stored_bytes(api)
    for f in files:
        answers = await asyncio.gather(*(api.request("DELETE", f"/v1/files/{f['id']}") for _ in range(20)))
        assert sorted(a.status for a in answers) == [200] + [404] * 19, [a.status for a in answers]
        for a in answers:
            if a.status == 404:
                a.error(404, param="file_id")
    assert await _stored_bytes(api) == before - sum(f["bytes"] for f in files)
    assert api.storage.stored_files() == []


async def test_delete_of_a_foreign_file_changes_nothing(api):
    f = await api.upload_ok()
    h = await _record(api, f["id"])
    r = redis_of(api)
    foreign = msgspec.structs.replace(h, owner=store.owner_of("tok-b"))
    assert (await store.delete_file(r, foreign, "op-x"))[0] is False
    assert (await api.request("GET", f"/v1/files/{f['id']}")).ok() == f


async def test_expiry_sweep_and_delete_give_bytes_back_once(api):
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    before = await _stored_bytes(api)
    h = await _record(api, f["id"])  # what a DELETE read before the sweep ran
    # Its expiry is due now.
    member = store.expiry_member(h.id, h.storage_key, h.owner, h.bytes)
    await r.zadd(_expiry(h.id), {member: 1})
    assert await store.sweep_expired_files(r, api.storage) == 1
    assert (await store.delete_file(r, h, "op-late"))[0] is False
    (await api.request("DELETE", f"/v1/files/{f['id']}")).error(404)
    assert await store.sweep_expired_files(r, api.storage) == 0
    assert await _stored_bytes(api) == before - f["bytes"]
    assert api.storage.stored_files() == []


async def test_delete_before_the_sweep_leaves_it_nothing(api):
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    before = await _stored_bytes(api)
    h = await _record(api, f["id"])
    await r.zadd(_expiry(h.id), {store.expiry_member(h.id, h.storage_key, h.owner, h.bytes): 1})
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True
    assert await store.sweep_expired_files(r, api.storage) == 0
    assert await _stored_bytes(api) == before - f["bytes"]


async def test_record_expired_on_its_own_is_given_back_once(api):
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    before = await _stored_bytes(api)
    h = await _record(api, f["id"])
    await r.zadd(_expiry(h.id), {store.expiry_member(h.id, h.storage_key, h.owner, h.bytes): 1})
    await r.delete(keys.file(f["id"]))  # what its TTL does at expires_at

    async def delete_like_the_handler():
        deleted, marker = await store.delete_file(r, h, "op-racing")
        if marker:
            await api.storage.delete(h.storage_key)
            await store.content_removed(r, marker)
        return int(deleted)

    # The sweep and a DELETE that had read the record just before it expired race for it.
    results = await asyncio.gather(
        store.sweep_expired_files(r, api.storage), delete_like_the_handler(), store.sweep_expired_files(r, api.storage)
    )
    assert sum(results) == 1, results
    assert await _stored_bytes(api) == before - f["bytes"]
    assert api.storage.stored_files() == []
    assert await _expiring(r) == 0


async def _time_passes(r, file_id: str) -> None:
    """What FILE_TOMBSTONE_S and more do: the tombstone expires and the content marker comes due."""
    await r.delete(keys.file_tombstone(file_id))
    for member in await r.zrange(_expiry(file_id), 0, -1):
        if member.decode().startswith(file_id + " "):
            await r.zadd(_expiry(file_id), {member: 1})


async def test_failed_content_delete_is_retried_by_the_sweep(api, monkeypatch):
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    before = await _stored_bytes(api)
    real_delete = api.storage.delete

    async def failing_delete(key):
        raise OSError("storage unavailable")

    monkeypatch.setattr(api.storage, "delete", failing_delete)
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True
    assert api.storage.stored_files() == [f["id"]]
    assert await store.sweep_expired_files(r, api.storage) == 0  # not due yet
    await _time_passes(r, f["id"])
    assert await store.sweep_expired_files(r, api.storage) == 1  # fails again: kept for later
    assert api.storage.stored_files() == [f["id"]]
    monkeypatch.setattr(api.storage, "delete", real_delete)
    await _time_passes(r, f["id"])
    assert await store.sweep_expired_files(r, api.storage) == 1
    assert api.storage.stored_files() == []
    assert await _expiring(r) == 0
    assert await _stored_bytes(api) == before - f["bytes"]  # given back once, by the DELETE


async def test_content_of_a_delete_cut_short_is_removed_by_the_sweep(api):
    # The web process dies right after the script ran: the content is still stored.
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    before = await _stored_bytes(api)
    deleted, marker = await store.delete_file(r, await _record(api, f["id"]), "op-killed")
    assert deleted and marker
    assert api.storage.stored_files() == [f["id"]]
    await _time_passes(r, f["id"])
    assert await store.sweep_expired_files(r, api.storage) == 1
    assert api.storage.stored_files() == []
    assert await _expiring(r) == 0
    assert await _stored_bytes(api) == before - f["bytes"]


async def test_content_read_by_a_batch_gets_no_marker(api):
    r = redis_of(api)
    f = await api.upload_ok(good_jsonl(2))
    await r.sadd(keys.file_refs(f["id"]), "batch_000000000001aaaaaaaaaaaa")  # an unfinished batch reads it
    assert await store.delete_file(r, await _record(api, f["id"]), "op-read") == (True, None)
    assert await _expiring(r) == 0  # the batch's release removes the content
    assert api.storage.stored_files() == [f["id"]]
