"""The history is kept per shard and minute; readers fold past minutes into one hash per minute
(``counters.fold_history``), exactly once whatever dies, races or comes late."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.core import counters, keys, store, streams
from service.core.counters import Attempts

BATCHES = ("batch_0", "batch_7", "batch_c")  # three shards


@pytest.fixture
def redis():
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def _running_batch(redis, batch_id: str) -> None:
    await redis.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
    await redis.hset(keys.batch(batch_id), mapping={"completed": 0, "failed": 0, "total": 99})


async def _record(redis, batch_id: str, first: int, n: int) -> None:
    sent = Attempts("default")
    sent.add("429", 0.02)
    sent.add("200", 0.3)
    results = [(i, "", "completed", b"{}", *sent.encode("completed")) for i in range(first, first + n)]
    assert await store.record_results(redis, batch_id, [*results, (first + n, "", "failed", b"{}")]) == n + 1


def _sums(history: dict) -> tuple[int, int, int, int]:
    total = history["total"]
    return sum(total["completed"]), sum(total["failed"]), sum(total["requests"]), sum(total["rate_limited"])


class _Clock:
    """The recording's clock, stopped at ``now`` (so every line lands in one known minute)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return self.now


async def _recorded(redis, monkeypatch) -> tuple[float, int]:
    """Lines recorded into three shards; their time and minute."""
    now = time.time()
    monkeypatch.setattr(store, "time", _Clock(now))
    for n, batch_id in enumerate(BATCHES, 1):
        await _running_batch(redis, batch_id)
        await _record(redis, batch_id, 0, n)
    return now, counters.minute_of(now)


async def test_past_minutes_fold_into_one_hash_each_and_read_the_same(redis, monkeypatch):
    now, minute = await _recorded(redis, monkeypatch)
    expected = (6, 3, 12, 6)  # 1 + 2 + 3 lines sent twice (a 429, then 200) and one unsent failure per batch
    fresh = await counters.read_history(redis, now=now + 1, minutes=3)
    assert _sums(fresh) == expected
    shards = [keys.shard_of(b) for b in BATCHES]
    assert await redis.exists(*(keys.history(s, minute) for s in shards)) == len(shards)

    later = now + 10 * 60  # the minute ended long ago: the read folds it
    folded = await counters.read_history(redis, now=later, minutes=15)
    assert _sums(folded) == expected
    assert folded["total"]["completed"][folded["minutes"].index(minute)] == 6
    assert folded["total"]["latency_mean_s"][folded["minutes"].index(minute)] == pytest.approx(0.16)
    for s in shards:
        assert not await redis.exists(keys.history(s, minute), keys.history_folding(s, minute))
        assert await redis.zcard(keys.history_index(s)) == 0
    assert 0 < await redis.ttl(keys.history_total(minute)) <= counters.HISTORY_TTL_S
    # Read again, and folded again (nothing left to fold): the same.
    assert await counters.fold_history(redis, now=later) == 0
    assert await counters.read_history(redis, now=later, minutes=15) == folded


async def test_every_key_a_recording_creates_expires_and_later_calls_leave_it_so(redis, monkeypatch):
    now, minute = await _recorded(redis, monkeypatch)
    shard = keys.shard_of("batch_7")
    await _record(redis, "batch_7", 10, 3)  # the same minute again: hash and index exist already
    assert 0 < await redis.ttl(keys.history(shard, minute)) <= counters.HISTORY_TTL_S
    assert 0 < await redis.ttl(keys.history_index(shard)) <= counters.HISTORY_TTL_S
    assert await redis.zrange(keys.history_index(shard), 0, -1) == [str(minute).encode()]
    # The next minute joins the index, and minutes older than the history leave it.
    stale = minute - counters.HISTORY_TTL_S - 60
    await redis.zadd(keys.history_index(shard), {str(stale): stale})
    monkeypatch.setattr(store, "time", _Clock(now + 60))
    await _record(redis, "batch_7", 20, 1)
    nxt = counters.minute_of(now + 60)
    assert await redis.zrange(keys.history_index(shard), 0, -1) == [str(minute).encode(), str(nxt).encode()]
    assert 0 < await redis.ttl(keys.history(shard, nxt)) <= counters.HISTORY_TTL_S


async def test_a_recording_paused_past_the_fold_is_folded_by_the_next_read(redis, monkeypatch):
    now, minute = await _recorded(redis, monkeypatch)
    later = now + 10 * 60
    assert _sums(await counters.read_history(redis, now=later, minutes=15)) == (6, 3, 12, 6)

    # A worker that took its minute, then stood still for ten minutes, records into it now.
    await _record(redis, "batch_0", 10, 2)
    assert await redis.exists(keys.history(keys.shard_of("batch_0"), minute))
    # The hash it wrote again expires like any minute's (the call that creates a hash gives it its TTL).
    assert 0 < await redis.ttl(keys.history(keys.shard_of("batch_0"), minute)) <= counters.HISTORY_TTL_S
    after = await counters.read_history(redis, now=later, minutes=15)
    assert _sums(after) == (8, 4, 16, 8)
    assert after["total"]["completed"][after["minutes"].index(minute)] == 8


async def test_readers_folding_at_once_count_once(redis, monkeypatch):
    now, _ = await _recorded(redis, monkeypatch)
    reads = await asyncio.gather(*(counters.read_history(redis, now=now + 600, minutes=15) for _ in range(6)))
    assert {_sums(h) for h in reads} == {(6, 3, 12, 6)}


class _DiesAfter:
    """A client whose process dies (ConnectionError) right after its ``n``-th pipeline ran in Redis."""

    def __init__(self, redis, n: int) -> None:
        self.redis, self.n = redis, n

    def __getattr__(self, name: str):
        return getattr(self.redis, name)

    def pipeline(self, transaction: bool = True):
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def run(raise_on_error: bool = True):
            replies = await execute(raise_on_error)
            self.n -= 1
            if self.n == 0:
                raise RedisConnectionError("killed after the step ran")
            return replies

        pipe.execute = run
        return pipe


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
async def test_a_fold_killed_after_any_step_neither_loses_nor_doubles(redis, monkeypatch, steps):
    now, minute = await _recorded(redis, monkeypatch)
    later = now + 600
    with pytest.raises(RedisConnectionError):
        await counters.fold_history(_DiesAfter(redis, steps), now=later)
    # Another reader comes (or the same one restarted): every count exactly once.
    history = await counters.read_history(redis, now=later, minutes=15)
    assert _sums(history) == (6, 3, 12, 6)
    assert history["total"]["completed"][history["minutes"].index(minute)] == 6
    for s in (keys.shard_of(b) for b in BATCHES):
        assert not await redis.exists(keys.history(s, minute), keys.history_folding(s, minute))


async def test_the_current_minutes_are_summed_over_the_shards_unfolded(redis, monkeypatch):
    now, minute = await _recorded(redis, monkeypatch)
    assert await counters.fold_history(redis, now=now) == 0
    history = await counters.read_history(redis, now=now, minutes=2)
    assert _sums(history) == (6, 3, 12, 6)
    assert not await redis.exists(keys.history_total(minute))


async def test_a_read_folds_only_its_own_window(redis, monkeypatch):
    now, minute = await _recorded(redis, monkeypatch)
    later = now + 2 * 3600
    assert _sums(await counters.read_history(redis, now=later, minutes=60)) == (0, 0, 0, 0)
    assert await redis.zcard(keys.history_index(keys.shard_of(BATCHES[0]))) == 1  # left for a wider read
    day = await counters.read_history(redis, now=later, minutes=1440)
    assert _sums(day) == (6, 3, 12, 6)
    assert await redis.zcard(keys.history_index(keys.shard_of(BATCHES[0]))) == 0


async def test_the_finalizers_sweep_keeps_the_history_folded(redis, monkeypatch, tmp_path):
    from service.core.config import Settings
    from service.core.storage import LocalStorage
    from workers.finalizer import Finalizer

    monkeypatch.setattr(store, "time", _Clock(time.time() - 10 * 60))  # recorded ten minutes ago
    for n, batch_id in enumerate(BATCHES, 1):
        await _running_batch(redis, batch_id)
        await _record(redis, batch_id, 0, n)
    minute = counters.minute_of(store.time.time())
    fin = Finalizer(Settings(data_dir=tmp_path), LocalStorage(tmp_path))
    fin.redis = redis
    await fin._sweep()
    assert not [s for s in range(keys.SHARDS) if await redis.zcard(keys.history_index(s))], "nothing was folded"
    assert int((await redis.hgetall(keys.history_total(minute)))[b"completed"]) == 6
