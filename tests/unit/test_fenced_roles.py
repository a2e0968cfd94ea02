"""Each role resuming from a pause past its lease (as after SIGSTOP) changes nothing it no longer owns.

Here the pause is simulated where it can be made exact: the lease expires (its key goes) and a
peer takes it, while the paused role still believes it holds it; then the role carries on. The
real-process version of each scenario is in tests/integration/test_pause.py.
"""

from __future__ import annotations

import time

import fakeredis
import pytest
from structlog.testing import capture_logs

from service.core import keys, leases, streams
from service.core.config import Settings
from service.core.storage import LocalStorage
from service.web import appkeys, feeder
from workers.limits import Limiter
from workers.worker import Line, Worker

from .conftest import poll
from .test_feeder_faults import _finish_published, _jsonl, _published, _running_batch


@pytest.fixture
def settings():
    return Settings.from_env({"SLUICE_UPSTREAM_URL": "http://127.0.0.1:9"})


async def test_a_paused_feeder_publishes_nothing_once_a_peer_holds_its_batch(tmp_path, settings):
    r = fakeredis.FakeAsyncRedis()
    storage = LocalStorage(tmp_path)
    await _running_batch(r, storage, "batch_a", _jsonl("c", 20), 20, window=4)
    paused = feeder.Feeder(r, storage, settings, "web-1")
    await paused.tick()
    assert [c for _, c in await _published(r, "batch_a")] == ["c0", "c1", "c2", "c3"]
    # Its lease runs out while it is stopped, and another web process takes the batch over.
    await r.delete(keys.feeder("batch_a"))
    assert await leases.take(r, keys.feeder("batch_a"), "web-2", 10_000) is not None
    await _finish_published(r, "batch_a")
    with capture_logs() as logged:
        await paused.tick()  # resumed: it still believes the lease is its own (not due for renewal)
    assert [e["event"] for e in logged] == ["fenced_write_refused"], logged
    assert len(await _published(r, "batch_a")) == 4, "the paused feeder published for a batch it lost"
    assert int(await r.hget(keys.batch("batch_a"), "feed_index")) == 4
    # The peer feeds on from there: no line twice, none skipped.
    peer = feeder.Feeder(r, storage, settings, "web-2")
    for _ in range(8):
        await peer.tick()
        await paused.tick()
        await _finish_published(r, "batch_a")
    assert await _published(r, "batch_a") == [(f"0-{i + 1}", f"c{i}") for i in range(20)]


async def test_a_paused_validator_writes_nothing_for_a_batch_a_peer_holds(make_api):
    api = await make_api(lease_s=1.0)  # validator leases of 1 s
    r = api.client.server.app[appkeys.REDIS]
    api.storage.hold()
    batch = await api.submit()
    await poll(lambda: _set(api.storage.reading), message="the publisher to start validating")
    lease_key = keys.validator(batch["id"])
    # Frozen past its lease, which expires; a peer web process takes the batch.
    await poll(lambda: _gone(r, lease_key), timeout=10, message="the frozen validator's lease to expire")
    peer = await leases.take(r, lease_key, "web-2", 60_000)
    assert peer is not None
    with capture_logs() as logged:
        api.storage.release()
        await poll(
            lambda: _logged(logged, "fenced_write_refused"),
            timeout=10,
            message="the resumed validator to have its writes refused",
        )
    h = await r.hgetall(keys.batch(batch["id"]))
    assert h[b"status"] == b"validating" and h[b"total"] == b"0", h
    assert not await r.exists(keys.lines(batch["id"])), "the resumed validator created the batch's streams"
    assert await r.zscore(keys.pending_validation(keys.shard_of(batch["id"])), batch["id"]) is not None
    # The peer dies without finishing: once its lease is gone, the batch is validated and started once.
    await leases.drop(r, peer)
    started = await api.wait_batch(batch["id"], timeout=10)
    assert started["status"] == "in_progress" and started["request_counts"]["total"] == 2, started


async def test_a_renewal_never_resurrects_an_expired_provider_slot():
    r = fakeredis.FakeAsyncRedis()
    limiter = Limiter(r, lease_s=2.0)
    key = keys.provider_inflight("p")
    now = int(time.time() * 1000)
    # "expired" ran out while its worker was paused; "released" ended normally.
    await r.zadd(key, {"expired": now - 1, "running": now + 1000})
    # Each line's request in flight holds a lease of its own (the limiter maps line -> lease).
    limiter.leases.update({name: name for name in ("expired", "running", "released")})
    assert await limiter.renew("p", ["expired", "running", "released"]) == 1
    scores = {m.decode(): s for m, s in await r.zrange(key, 0, -1, withscores=True)}
    assert scores["expired"] == now - 1, "a renewal brought an expired slot back"
    assert scores["running"] > now + 1000 and "released" not in scores


async def test_a_paused_worker_does_not_take_back_lines_a_peer_reclaimed(settings):
    r = fakeredis.FakeAsyncRedis()
    stream = keys.lines("batch_a")
    await r.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    for i in (1, 2):
        await r.xadd(stream, {streams.LINE_CUSTOM_ID: f"c{i}"}, id=f"0-{i}")
    worker = Worker(settings)
    worker.redis = r
    await r.xreadgroup(keys.WORKER_GROUP, worker.name, {stream: ">"})
    # While the worker was stopped, a peer reclaimed line 0-1 (its lease had run out).
    await r.xclaim(stream, keys.WORKER_GROUP, "peer", 0, ["0-1"])
    lines = [Line("batch_a", f"0-{i}", i - 1, f"c{i}", b"{}", "default", 1) for i in (1, 2)]
    await worker._set_idle(lines, 0)  # what its lease renewal does once resumed
    owners = {
        p["message_id"].decode(): p["consumer"].decode()
        for p in await r.xpending_range(stream, keys.WORKER_GROUP, min="-", max="+", count=10)
    }
    assert owners == {"0-1": "peer", "0-2": worker.name}, owners


def _set(event):
    async def check():
        return event.is_set()

    return check()


async def _gone(r, key: str) -> bool:
    return not await r.exists(key)


async def _logged(logged: list[dict], event: str) -> bool:
    return any(e["event"] == event for e in logged)
