"""The finalizers share the shards' chores: each holds the "webhooks" leases of a fair share of the
shards, together all of them, and a fenced sweep covers its own shard only."""

from __future__ import annotations

import fakeredis
import pytest

from service.core import keys, leases, store
from service.core.config import Settings
from service.core.storage import LocalStorage
from service.core.webhooks import WebhookSender
from workers.finalizer import Finalizer


def _finalizer(r, tmp_path, name: str) -> Finalizer:
    settings = Settings(data_dir=tmp_path)
    fin = Finalizer(settings, LocalStorage(tmp_path))
    fin.name = name
    fin.redis = r
    fin.webhooks = WebhookSender(r, settings)
    return fin


def _webhook_shards(fin: Finalizer) -> set[int]:
    return {shard for chore, shard in fin.chores if chore == "webhooks"}


async def test_finalizers_split_the_webhook_shards_and_shed_for_a_newcomer(tmp_path):
    r = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    first, second = _finalizer(r, tmp_path, "fin-1"), _finalizer(r, tmp_path, "fin-2")
    await first._share_webhooks()
    assert _webhook_shards(first) == set(range(keys.SHARDS))  # alone: every shard
    # A second finalizer checks in: the first sheds down to its share, the second takes the rest.
    first.finalizers = second.finalizers = 2
    await first._share_webhooks()
    assert len(_webhook_shards(first)) == keys.SHARDS // 2
    await second._share_webhooks()
    assert _webhook_shards(second) == set(range(keys.SHARDS)) - _webhook_shards(first)
    # Each lease is its shard's, held by the finalizer that has it.
    for fin in (first, second):
        for (_, shard), lease in fin.chores.items():
            assert lease.key == keys.housekeeping("webhooks", shard)
            assert leases.holder_of(await r.get(lease.key)) == fin.name


async def test_a_fenced_sweep_names_its_shard(tmp_path):
    r = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    lease = await leases.take(r, keys.housekeeping("sweep", 3), "fin-1", 10_000)
    with pytest.raises(ValueError):
        await store.sweep_expired_files(r, LocalStorage(tmp_path), lease=lease)
    assert await store.sweep_expired_files(r, LocalStorage(tmp_path), shard=3, lease=lease) == 0
