"""The counters on a real Redis Cluster: recording (``store.record_results``/``record_many``) moves the
metrics, history and usage of the batch's shard only, one slot per script, and every reader (the
snapshot behind /metrics, the history with its fold, the usage report) sums the shards exactly."""

from __future__ import annotations

import time

import pytest

from service.core import cluster, counters, keys, store, streams, usage
from service.core.config import Provider, Settings
from service.core.connections import connect
from service.core.counters import Attempts
from service.core.heartbeat import Heartbeat

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(120)]

BATCHES = [f"batch_{d}" for d in "0123456789abcdef"]  # one in each shard
PROVIDERS = (Provider(name="default", base_url="http://127.0.0.1:9", models=("*",)),)


def _sums(history: dict) -> dict[str, int]:
    return {name: sum(history["total"][name]) for name in ("completed", "failed", "requests", "rate_limited")}


async def test_counters_recorded_in_every_shard_sum_exactly(redis_cluster):
    settings = Settings(redis_url=redis_cluster.url, providers=PROVIDERS)
    r = connect(settings, max_connections=8)
    try:
        assert len({redis_cluster.master_of_key(keys.batch(b)).port for b in BATCHES}) == 3
        for n, batch_id in enumerate(BATCHES):
            await r.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
            await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
            await r.hset(keys.batch(batch_id), mapping={"owner": f"o{n % 2}", "completed": 0, "failed": 0})
        sent = Attempts("default")
        sent.add("429", 0.02)
        sent.paused()
        sent.add("200", 0.3)
        # Batch n: n + 1 lines sent (a 429 that paused the provider, then a 200) with their tokens,
        # and one line never sent.
        by_batch = {
            batch_id: [
                *((i, "", "completed", b"{}", "3 1 2 0 default|m", *sent.encode("completed")) for i in range(n + 1)),
                (n + 1, "", "failed", b"{}"),
            ]
            for n, batch_id in enumerate(BATCHES)
        }
        half = len(BATCHES) // 2
        for batch_id in BATCHES[:half]:
            assert await store.record_results(r, batch_id, by_batch[batch_id]) == len(by_batch[batch_id])
        await store.record_many(r, {b: by_batch[b] for b in BATCHES[half:]})  # one pipeline over every master
        # Everything again (redeliveries, re-sent scripts): nothing moves.
        assert await store.record_results(r, BATCHES[0], by_batch[BATCHES[0]]) == 0
        await store.record_many(r, by_batch)
        assert await Heartbeat(r, "w-1", "worker").beat()

        sent_lines = sum(range(1, len(BATCHES) + 1))
        snap = await cluster.snapshot(r, settings)
        assert snap.lines == {"completed": sent_lines, "failed": len(BATCHES)}
        assert snap.upstream == {
            "retries|default": sent_lines,
            "rate_limited|default": sent_lines,
            "pauses|default": sent_lines,
        }
        assert (snap.latency["default|200|count"], snap.latency["default|429|count"]) == (str(sent_lines),) * 2
        assert int(snap.latency["default|200|sum_us"]) == sent_lines * 300_000
        assert snap.tokens == {
            "default|m|input": 3 * sent_lines,
            "default|m|cached": sent_lines,
            "default|m|output": 2 * sent_lines,
            "default|m|requests": sent_lines,
        }
        assert [p.name for p in snap.processes] == ["w-1"]

        expected = {
            "completed": sent_lines,
            "failed": len(BATCHES),
            "requests": 2 * sent_lines,
            "rate_limited": sent_lines,
        }
        now = time.time()
        assert _sums(await counters.read_history(r, now=now, minutes=3)) == expected
        # Ten minutes on, the reader folds every shard's minutes into one hash per minute.
        assert await counters.fold_history(r, now=now + 600) >= len(BATCHES)
        assert _sums(await counters.read_history(r, now=now + 600, minutes=15)) == expected
        for s in range(keys.SHARDS):
            assert await r.zrange(keys.history_index(s), 0, -1) == []

        for owner, parity in (("o0", 0), ("o1", 1)):
            rows, _, _ = await usage.report(r, owner, 2)
            lines = sum(n + 1 for n in range(len(BATCHES)) if n % 2 == parity)
            assert [(u.provider, u.model) for u in rows] in ([("default", "m")], [("default", "m")] * 2)
            assert sum(u.requests for u in rows) == lines
            assert sum(u.input_tokens for u in rows) == 3 * lines
            assert sum(u.input_tokens_details.cached_tokens for u in rows) == lines
            assert sum(u.output_tokens for u in rows) == 2 * lines
    finally:
        await r.aclose()
