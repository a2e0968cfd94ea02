"""Reading the per-shard indexes as one: every shard keeps its own set of live, active, feeding, ...
batches (``keys.live_batches(shard)``, ...) in its own slot, and readers go over all of them.

Each reader sends one command per shard in one pipeline: one round trip on a single Redis, one
per node on a Redis Cluster (redis-py splits the pipeline by node and sends the parts at once).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

from redis.crc import key_slot

from . import keys
from .connections import Redis

# A per-shard key: ``keys.live_batches``, ``keys.webhooks_due``, ...
ShardKey = Callable[[int], str]


async def members(r: Redis, set_key: ShardKey) -> list[str]:
    """The members of ``set_key`` over every shard, sorted."""
    pipe = r.pipeline(transaction=False)
    for shard in range(keys.SHARDS):
        pipe.smembers(set_key(shard))
    return sorted({m.decode() for reply in await pipe.execute() for m in reply})


async def count(r: Redis, set_key: ShardKey, *, zset: bool = False) -> int:
    """How many members ``set_key`` (a sorted set with ``zset``) has over every shard."""
    pipe = r.pipeline(transaction=False)
    for shard in range(keys.SHARDS):
        if zset:
            pipe.zcard(set_key(shard))
        else:
            pipe.scard(set_key(shard))
    return sum(int(n) for n in await pipe.execute())


async def due(
    r: Redis, zset_key: ShardKey, until: float, limit: int, shards: Sequence[int] | None = None
) -> list[tuple[str, int]]:
    """Up to ``limit`` members of ``zset_key`` scored at most ``until``, lowest score first, over
    ``shards`` (every shard by default), each with its shard."""
    chosen = range(keys.SHARDS) if shards is None else shards
    pipe = r.pipeline(transaction=False)
    for shard in chosen:
        pipe.zrangebyscore(zset_key(shard), "-inf", until, start=0, num=limit, withscores=True)
    found = [
        (float(score), member.decode(), shard)
        for shard, reply in zip(chosen, await pipe.execute())
        for member, score in reply
    ]
    found.sort()
    return [(member, shard) for _, member, shard in found[:limit]]


async def mget(r: Redis, names: Sequence[str]) -> list[bytes | None]:
    """GET of every key in ``names``, in order: one MGET per cluster slot, all in one pipeline."""
    by_slot: dict[int, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        by_slot[key_slot(name.encode())].append(i)
    if not by_slot:
        return []
    pipe = r.pipeline(transaction=False)
    for positions in by_slot.values():
        pipe.mget([names[i] for i in positions])
    values: list[bytes | None] = [None] * len(names)
    for positions, reply in zip(by_slot.values(), await pipe.execute()):
        for i, value in zip(positions, reply):
            values[i] = value
    return values
