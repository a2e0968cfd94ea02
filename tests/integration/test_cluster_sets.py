"""The per-shard batch sets, their chores, ``leases.execute`` and the worker's per-shard reads on a
real Redis Cluster, through ``connect()`` (docs/cluster-design.md).

A batch in each of the 16 shards (spread over the 3 masters) is moved the way the publisher, the
feeder, the worker and the finalizer move it: every script and read here must keep to one slot,
or the cluster client refuses it before sending anything.
"""

from __future__ import annotations

import base64

import pytest
from redis.exceptions import ResponseError

from service.core import keys, leases, shards, store
from service.core.config import Settings
from service.core.connections import connect
from service.core.webhooks import WebhookSender
from service.web.feeder import _FEED
from service.web.publisher import _CREATE_GROUPS
from workers.finalizer import Finalizer
from workers.scheduling import TURN_LINES
from workers.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(180)]

CHAT = "/v1/chat/completions"
LINES = 2
SECRET = "whsec_" + base64.b64encode(b"cluster-sets-test-webhook-secret").decode()
LIVE = (keys.live_batches, keys.active_batches, keys.feeding_batches)


def _batch_id(shard: int) -> str:
    return f"batch_{shard + 1:012x}{'0' * 11}{keys.shard_digit(shard)}"


async def _start(r, batch_id: str) -> None:
    """What creation and the publisher do to a batch: queue it, create its streams, start it."""
    shard = keys.shard_of(batch_id)
    await r.hset(
        keys.batch(batch_id),
        mapping={
            "id": batch_id,
            "status": "validating",
            "owner": "o",
            "endpoint": CHAT,
            "priority": "normal",
            "expires_at": 4_000_000_000,
            "webhook_url": "http://127.0.0.1:9/hook",
        },
    )
    lease = await leases.take(r, keys.validator(batch_id), "web-1", 30_000)
    assert lease is not None
    await leases.execute(r, lease, ("ZADD", keys.pending_validation(shard), 0, batch_id))
    assert await shards.due(r, keys.pending_validation, 1, 100, shards=[shard]) == [(batch_id, shard)]
    await _CREATE_GROUPS(
        r, streams=[keys.lines(batch_id), keys.results(batch_id)], groups=[keys.WORKER_GROUP, "finalizer"], lease=lease
    )
    applied, _ = await store.transition(
        r,
        batch_id,
        allowed=["validating"],
        fields={"status": "in_progress", "total": LINES, "feed_index": 0, "feed_offset": 0},
        add_to=LIVE,
        lease=lease,
    )
    assert applied
    await leases.execute(r, lease, ("ZREM", keys.pending_validation(shard), batch_id))
    feeder = await leases.take(r, keys.feeder(batch_id), "web-1", 30_000)
    assert feeder is not None
    lines: list[str | int] = []
    for i in range(LINES):
        lines += [i, f"req-{i}", '{"model": "m"}', "default", 1]
    got = await _FEED(
        r,
        batch=keys.batch(batch_id),
        stream=keys.lines(batch_id),
        expected_index=0,
        offset=100,
        next_index=LINES,
        stride=5,
        lines=lines,
        lease=feeder,
    )
    assert got == LINES
    await leases.execute(r, feeder, ("SREM", keys.feeding_batches(shard), batch_id))


async def test_batches_of_every_shard_on_a_cluster(redis_cluster, tmp_path):
    settings = Settings(
        redis_url=redis_cluster.url,
        data_dir=tmp_path,
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_max_attempts=1,
    )
    r = connect(settings, max_connections=8)
    ids = [_batch_id(shard) for shard in range(keys.SHARDS)]
    assert len({redis_cluster.master_of_key(keys.batch(b)).port for b in ids}) == 3
    fin = Finalizer(settings, None)  # type: ignore[arg-type]  # no file is written here
    fin.redis = r
    fin.webhooks = WebhookSender(r, settings)
    try:
        for batch_id in ids:
            await _start(r, batch_id)
        assert await shards.members(r, keys.live_batches) == ids
        assert await shards.members(r, keys.active_batches) == ids
        assert await shards.count(r, keys.feeding_batches) == 0
        assert await shards.count(r, keys.pending_validation, zset=True) == 0

        # The worker reads every batch's lines: one XREADGROUP per shard (and count), none blocking.
        worker = Worker(settings)
        worker.redis = r
        plan = await worker._pick_streams(TURN_LINES * keys.SHARDS)  # a turn for every batch
        assert sorted(plan) == ids
        lines, aborts, blocked = await worker._read(plan)
        assert sorted((line.batch_id, line.index) for line in lines) == [(b, i) for b in ids for i in range(LINES)]
        assert aborts == {} and not blocked
        # A lone read covering every candidate may block (and finds nothing more).
        worker.candidates = worker.candidates[:1]
        _, _, blocked = await worker._read({ids[0]: 1})
        assert blocked

        # The finalizer takes every batch's lease (one MGET per shard) and ends each batch with
        # its sets, work keys and webhook in the same step.
        await fin._check_in()
        await fin._share(await shards.members(r, keys.live_batches))
        assert sorted(fin.held) == ids
        for batch_id, lease in fin.held.items():
            applied, _ = await store.transition(
                r,
                batch_id,
                allowed=["in_progress"],
                fields={"status": "completed", "completed_at": store.now()},
                remove_from=LIVE,
                delete=[k for k in keys.work_keys(batch_id) if k != lease.key],
                expire_s=3600,
                lease=lease,
            )
            assert applied
            shard = keys.shard_of(batch_id)
            await leases.execute(r, lease, ("ZREM", keys.pending_validation(shard), batch_id))
        assert await shards.count(r, keys.live_batches) == 0 and await shards.count(r, keys.active_batches) == 0
        assert await shards.count(r, keys.webhooks_due, zset=True) == keys.SHARDS

        # The chores: every shard's sweep lease in turn, a fair share (all) of the webhook leases,
        # and one pass that delivers (here: gives up on) every shard's webhook.
        await fin._sweep()
        await fin._share_webhooks()
        held = {shard: lease for (chore, shard), lease in fin.chores.items() if chore == "webhooks"}
        assert sorted(held) == list(range(keys.SHARDS))
        assert await fin.webhooks.run_pass(held) == keys.SHARDS
        assert await shards.count(r, keys.webhooks_due, zset=True) == 0
        assert {(await r.hget(keys.batch(b), "webhook_state")) for b in ids} == {b"failed"}

        # leases.execute: an unfenced call is routed by its first key; a key of another slot is
        # refused before anything is sent; a stale holder is refused by the server.
        assert await leases.execute(r, None, ("SADD", keys.live_batches(3), "x"), ("SCARD", keys.live_batches(3))) == [
            1,
            1,
        ]
        with pytest.raises(ValueError):
            await leases.execute(r, held[0], ("SREM", keys.live_batches(1), "x"))
        stale = held[5]
        await leases.drop(r, stale)
        with pytest.raises(leases.LeaseLost):
            await leases.execute(r, stale, ("ZREM", keys.webhooks_due(5), "x"))
        # What a cluster does with keys of two slots (the reason for all of the above).
        with pytest.raises(ResponseError):
            await r.eval("return redis.call('GET', ARGV[1])", 1, keys.live_batches(0), keys.live_batches(15))
    finally:
        await fin.webhooks.aclose()
        await r.aclose()
