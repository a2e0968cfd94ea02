"""The batch and file sets, their chores and ``leases.execute`` stay in one Redis Cluster slot per call.

A cluster refuses a script whose keys span slots (docs/cluster-design.md). These tests run the
flows that move batches between the per-shard sets on fakeredis (upload, validate, cancel, the
finalizer's tick with its chores, a webhook pass, a delete) with every script call recorded, and
check each call of the scripts of this area names keys of one slot. The cluster itself runs them
in tests/integration/test_cluster_sets.py.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from redis.crc import key_slot

from service.core import keys, leases, shards, store, webhooks
from service.core.connections import Script
from service.web import feeder, publisher
from service.web.appkeys import REDIS
from workers import delegate, finalizer

from .conftest import poll

# The scripts this area calls with set keys, leases or both.
_SCRIPTS = {
    "transition": store._TRANSITION.script,
    "execute": leases._EXECUTE.script,
    "webhook_done": webhooks._DONE.script,
    "webhook_bump": webhooks._BUMP.script,
    "delegate_write": delegate._WRITE.script,
    "feed": feeder._FEED.script,
    "create_groups": publisher._CREATE_GROUPS.script,
    "drain_read": finalizer._DRAIN_READ.script,
    "drain_commit": finalizer._DRAIN_COMMIT.script,
    "take": leases._TAKE,
    "renew": leases._RENEW,
    "drop": leases._DROP,
}
_NAMES = {id(script): name for name, script in _SCRIPTS.items()}


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, list[str]]]:
    """(script name, KEYS) of every call of the scripts above, run or queued on a pipeline."""
    seen: list[tuple[str, list[str]]] = []
    run, enqueue = Script.run, Script.enqueue

    async def recording_run(self, r, ks, args):
        if id(self) in _NAMES:
            seen.append((_NAMES[id(self)], list(ks)))
        return await run(self, r, ks, args)

    def recording_enqueue(self, pipe, ks, args):
        if id(self) in _NAMES:
            seen.append((_NAMES[id(self)], list(ks)))
        enqueue(self, pipe, ks, args)

    monkeypatch.setattr(Script, "run", recording_run)
    monkeypatch.setattr(Script, "enqueue", recording_enqueue)
    return seen


def _spanning(calls: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    return [(name, ks) for name, ks in calls if len({key_slot(k.encode()) for k in ks}) > 1]


@pytest.mark.parametrize("digit", "0123456789abcdef")
def test_a_shards_keys_share_its_slot(digit):
    batch_id, file_id = f"batch_{'0' * 23}{digit}", f"file-{'0' * 23}{digit}"
    shard = keys.shard_of(batch_id)
    named = [
        *keys.work_keys(batch_id),
        keys.batch(batch_id),
        keys.file(file_id),
        keys.file_refs(file_id),
        keys.file_tombstone(file_id),
        *(k(shard) for k in (keys.active_batches, keys.live_batches, keys.feeding_batches)),
        *(k(shard) for k in (keys.pending_validation, keys.delegated_batches, keys.webhooks_due, keys.file_expiry)),
        keys.housekeeping("sweep", shard),
        keys.housekeeping("webhooks", shard),
        keys.lease_seq(keys.housekeeping("sweep", shard)),
        keys.lease_seq(keys.finalizer(batch_id)),
    ]
    assert {key_slot(k.encode()) for k in named} == {key_slot(keys.SHARD_TAGS[shard].encode())}


async def test_a_batch_from_upload_to_its_webhook_stays_in_one_slot_per_call(make_api, tmp_path, calls):
    secret = "whsec_" + base64.b64encode(b"one-slot-test-webhook-secret-32b").decode()
    api = await make_api(webhook_secret=secret, webhook_allow_private=True, webhook_max_attempts=1)
    r = api.client.app[REDIS]
    f = await api.upload_ok()
    batch = (
        await api.request(
            "POST",
            "/v1/batches",
            headers={webhooks.HEADER: "http://127.0.0.1:9/hook"},
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
    ).ok()
    assert (await api.wait_batch(batch["id"]))["status"] == "in_progress"

    async def fed() -> bool:  # the feeder finds new batches within its scan interval, not at once
        return any(name == "feed" for name, _ in calls)

    await poll(fed, timeout=30, message="the feeder to publish the batch's lines")
    assert (await api.cancel(batch["id"])).ok()["status"] == "cancelling"

    fin = finalizer.Finalizer(api.settings, api.storage)
    fin.redis = r
    fin.webhooks = webhooks.WebhookSender(r, api.settings)
    try:

        async def ended() -> bool:
            await fin.tick()
            return (await api.get_batch(batch["id"]))["status"] == "cancelled"

        await poll(ended, timeout=30, message="the finalizer to end the cancelled batch")

        async def delivered() -> bool:
            await fin.tick()
            if fin.webhooks.task is not None:
                await asyncio.gather(fin.webhooks.task, return_exceptions=True)
            return await shards.count(r, keys.webhooks_due, zset=True) == 0

        await poll(delivered, timeout=30, message="the webhook to be given up")
    finally:
        await fin.webhooks.aclose()
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True

    assert _spanning(calls) == []
    used = {name for name, _ in calls}
    assert {"transition", "execute", "webhook_done", "webhook_bump", "feed", "create_groups", "drain_read"} <= used
    # Every chore lease a finalizer takes is its shard's, in the slot of the sets it covers.
    chores = {ks[0] for name, ks in calls if name == "take" and ks[0].endswith((":lease:sweep", ":lease:webhooks"))}
    assert chores == {keys.housekeeping(c, s) for c in ("sweep", "webhooks") for s in range(keys.SHARDS)}
