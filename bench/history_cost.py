"""What the 24 h history costs to read with 16 shards: ``python -m bench.history_cost [--repeat N]``.

Fills a private ``redis-server`` with a full day of history, every minute of every shard holding
what ``store.record_many`` writes for a realistic minute (two providers, 200s, a few 429s and
500s, latencies over several buckets), then times ``GET /v1/sluice/history?minutes=1440``'s work
(``counters.read_history``) four ways:

* *every shard*: the 1440 x 16 hashes summed, no fold (what the per-shard layout costs unfolded);
* *first read*: the same day never read before, so this read folds all 23,040 shard minutes;
* *folded*: a read after that (1440 folded hashes and the last minutes' shards: one hash per
  minute as before the shards, plus 3 x 16 x 2 recent reads);
* *a minute later*: a read that folds the 16 shard minutes of the minute that just ended.

Wall-clock, the best of ``--repeat``; the machine's load shows in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, cast

import redis.asyncio as aioredis

from bench.local_redis import private_redis
from service.core import counters, keys, store, streams
from service.core.connections import Redis
from service.core.counters import Attempts


async def _sample(r: Redis) -> dict[bytes, bytes]:
    """One shard's history hash of a busy minute, as recording writes it."""
    batch_id = "batch_0"
    await r.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)  # type: ignore[attr-defined]
    await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})  # type: ignore[attr-defined]
    await r.hset(keys.batch(batch_id), mapping={"owner": "o", "completed": 0, "failed": 0})
    results: list[store.Result] = []
    for i in range(200):
        a = Attempts("openai" if i % 3 else "azure")
        if i % 17 == 0:
            a.add("429", 0.05)
        if i % 23 == 0:
            a.add("500", 0.4)
        a.add("200", (0.03, 0.2, 0.7, 1.5, 4.0, 12.0)[i % 6])
        results.append(
            (i, "", "completed" if i % 29 else "failed", b"{}", *a.encode("completed" if i % 29 else "failed"))
        )
    await store.record_many(r, {batch_id: results})
    minute = counters.minute_of(time.time())
    shard = keys.shard_of(batch_id)
    h: dict[bytes, bytes] = await r.hgetall(keys.history(shard, minute))
    await cast(Any, r).flushall()
    return h


async def _fill(r: Redis, sample: dict[bytes, bytes], now: float) -> None:
    end = counters.minute_of(now)
    minutes = [end - counters.MINUTE_S * i for i in range(counters.HISTORY_S // counters.MINUTE_S)]
    for s in range(keys.SHARDS):
        pipe = cast(Any, r).pipeline(transaction=False)
        for m in minutes:
            pipe.hset(keys.history(s, m), mapping=sample)
            pipe.expire(keys.history(s, m), counters.HISTORY_TTL_S)
        pipe.zadd(keys.history_index(s), {str(m): m for m in minutes})
        await pipe.execute()


async def _every_shard(r: Redis, now: float) -> None:
    end = counters.minute_of(now)
    pipe = r.pipeline(transaction=False)
    for i in range(counters.HISTORY_S // counters.MINUTE_S):
        for s in range(keys.SHARDS):
            pipe.hgetall(keys.history(s, end - counters.MINUTE_S * i))
    summed: dict[bytes, int] = {}
    for h in await pipe.execute():
        for k, v in h.items():
            summed[k] = summed.get(k, 0) + int(v)


async def _timed(coro: Any) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def _main(port: int, repeat: int) -> None:
    r = cast(Redis, aioredis.Redis(host="127.0.0.1", port=port))
    try:
        await cast(Any, r).config_set("slowlog-log-slower-than", 1000)  # us
        sample = await _sample(r)
        print(f"one shard minute: {len(sample)} fields; {keys.SHARDS} shards x 1440 minutes")
        rows: dict[str, list[float]] = {}
        for _ in range(repeat):
            await cast(Any, r).flushall()
            now = time.time()
            await _fill(r, sample, now)
            rows.setdefault("every shard, unfolded (1440 x 16 HGETALL)", []).append(await _timed(_every_shard(r, now)))
            day = counters.read_history(r, now=now + 3 * counters.MINUTE_S, minutes=1440)
            await cast(Any, r).slowlog_reset()
            rows.setdefault("first read, folds 23,040 shard minutes", []).append(await _timed(day))
            slowest = max((e["duration"] for e in await cast(Any, r).slowlog_get(1000)), default=0)
            rows.setdefault("  its longest command in Redis", []).append(slowest / 1e6)
            folded = counters.read_history(r, now=now + 3 * counters.MINUTE_S, minutes=1440)
            rows.setdefault("folded (1440 HGETALL + recent shards)", []).append(await _timed(folded))
            for s in range(keys.SHARDS):
                m = counters.minute_of(now) + counters.MINUTE_S
                await cast(Any, r).hset(keys.history(s, m), mapping=sample)
                await cast(Any, r).zadd(keys.history_index(s), {str(m): m})
            later = counters.read_history(r, now=now + 4 * counters.MINUTE_S, minutes=1440)
            rows.setdefault("a minute later, folds 16", []).append(await _timed(later))
        for label, times in rows.items():
            if label.startswith(" "):  # a stall: the worst matters
                print(f"{label:48} {max(times) * 1000:9.0f} ms (worst of {len(times)})")
            else:
                print(f"{label:48} {min(times) * 1000:9.0f} ms (best of {len(times)})")
    finally:
        await cast(Any, r).aclose()


def main(argv: list[str] | None = None) -> int:
    """Start a private redis-server, measure, stop it."""
    parser = argparse.ArgumentParser(prog="python -m bench.history_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        with private_redis("sluice-history-cost-") as port:
            asyncio.run(_main(port, args.repeat))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
