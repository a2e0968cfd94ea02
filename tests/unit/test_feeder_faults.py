"""The feeder under faults: a failed feed call skips nothing, a broken batch holds up no other.

These drive ``Feeder.tick`` directly on fakeredis, with a fault injected into its script call;
workers are stood in for by marking every published line done.
"""

from __future__ import annotations

import json

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.core import keys, streams
from service.core.config import Settings
from service.core.storage import LocalStorage
from service.web import feeder

CHAT = "/v1/chat/completions"


def _jsonl(prefix: str, n: int) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"{prefix}{i}", "method": "POST", "url": CHAT, "body": {"model": "m", "messages": []}}
        ).encode()
        + b"\n"
        for i in range(n)
    )


async def _running_batch(r, storage, batch_id: str, data: bytes, n: int, window: int) -> None:
    async def chunks():
        yield data

    await storage.write(batch_id, chunks())
    await r.hset(
        keys.batch(batch_id),
        mapping={
            "status": "in_progress",
            "total": n,
            "completed": 0,
            "failed": 0,
            "feed_index": 0,
            "feed_offset": 0,
            "feed_window": window,
            "input_key": batch_id,
            "endpoint": CHAT,
            "provider": "",
        },
    )
    await r.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
    await r.sadd(keys.feeding_batches(keys.shard_of(batch_id)), batch_id)


async def _finish_published(r, batch_id: str) -> None:
    """What workers would do: every published line gets a result."""
    await r.hset(keys.batch(batch_id), "completed", await r.hget(keys.batch(batch_id), "feed_index"))


async def _published(r, batch_id: str) -> list[tuple[str, str]]:
    return [(eid.decode(), f[streams.LINE_CUSTOM_ID].decode()) for eid, f in await r.xrange(keys.lines(batch_id))]


@pytest.fixture
def settings():
    return Settings.from_env({"SLUICE_UPSTREAM_URL": "http://127.0.0.1:9"})


async def test_a_failed_feed_call_skips_no_line(tmp_path, settings, monkeypatch):
    r = fakeredis.FakeAsyncRedis()
    storage = LocalStorage(tmp_path)
    await _running_batch(r, storage, "batch_a", _jsonl("c", 10), 10, window=4)
    real, calls = feeder._FEED, []

    async def flaky(client, **params):
        calls.append(params["expected_index"])
        if len(calls) == 2:
            raise RedisConnectionError("connection dropped before the script ran")
        return await real(client, **params)

    monkeypatch.setattr(feeder, "_FEED", flaky)
    f = feeder.Feeder(r, storage, settings, "web-1")
    for _ in range(12):
        try:
            await f.tick()
        except RedisConnectionError:
            pass
        await _finish_published(r, "batch_a")
    assert len(calls) > 2, "the fault was never injected"
    assert await _published(r, "batch_a") == [(f"0-{i + 1}", f"c{i}") for i in range(10)]
    assert int(await r.hget(keys.batch("batch_a"), "feed_offset")) == len(_jsonl("c", 10))


async def test_a_batch_that_cannot_be_fed_does_not_hold_up_the_others(tmp_path, settings):
    r = fakeredis.FakeAsyncRedis()
    storage = LocalStorage(tmp_path)
    await _running_batch(r, storage, "batch_a", _jsonl("a", 5), 5, window=64)
    await _running_batch(r, storage, "batch_b", _jsonl("b", 5), 5, window=64)
    await storage.delete("batch_a")  # its input is gone: feeding it fails
    f = feeder.Feeder(r, storage, settings, "web-1")
    await f.tick()
    await f.tick()
    assert [c for _, c in await _published(r, "batch_b")] == [f"b{i}" for i in range(5)]
    assert await _published(r, "batch_a") == []
    # The broken batch rests, its lease given up, so a peer (or this process later) can retry it.
    assert await r.get(keys.feeder("batch_a")) is None
    assert "batch_a" in f.resting
