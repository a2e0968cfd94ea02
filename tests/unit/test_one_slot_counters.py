"""Guard: every script call of the counters' area (recording, the heartbeat, the history's fold)
declares keys of one cluster slot, so it runs on Redis Cluster. On fakeredis, by wrapping every
script call; tests/integration/test_cluster_counters.py runs them on a real cluster."""

from __future__ import annotations

import time

import fakeredis
import pytest

from service.core import counters, keys, store, streams
from service.core.connections import Script
from service.core.counters import Attempts
from service.core.heartbeat import Heartbeat
from service.devtools.shard_tags import key_slot


@pytest.fixture
def calls(monkeypatch):
    seen: list[list[str]] = []
    run, enqueue = Script.run, Script.enqueue

    async def checked_run(self, r, keys, args):
        seen.append(list(keys))
        return await run(self, r, keys, args)

    def checked_enqueue(self, pipe, keys, args):
        seen.append(list(keys))
        return enqueue(self, pipe, keys, args)

    monkeypatch.setattr(Script, "run", checked_run)
    monkeypatch.setattr(Script, "enqueue", checked_enqueue)
    return seen


async def test_recording_beating_and_folding_touch_one_slot_per_call(calls):
    r = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    sent = Attempts("default")
    sent.add("200", 0.1)
    ids = [f"batch_{d}" for d in "0369cf"]
    for batch_id in ids:
        await r.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
        await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
        await r.hset(keys.batch(batch_id), mapping={"owner": "o1", "completed": 0, "failed": 0})
    line = (0, "", "completed", b"{}", "3 0 2 0 default|m", *sent.encode("completed"))
    assert await store.record_results(r, ids[0], [line]) == 1
    await store.record_many(r, {b: [line, (1, "", "failed", b"{}")] for b in ids})
    assert await Heartbeat(r, "w-1", "worker").beat()
    history = await counters.read_history(r, now=time.time() + 600, minutes=15)
    assert sum(history["total"]["completed"]) == len(ids)

    assert len(calls) >= len(ids) + 1 + 1 + 3  # recordings, the beat, the fold's three steps
    for declared in calls:
        assert len({key_slot(k) for k in declared}) == 1, declared
