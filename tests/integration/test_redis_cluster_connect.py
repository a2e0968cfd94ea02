"""``connect()`` against a real single Redis and a real Redis Cluster: ``auto`` finds out which with
one ``INFO cluster`` and then behaves as the right client, scripts and pipelines included."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException

from service.core.config import Settings
from service.core.connections import Script, connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_INCR = Script(keys=("counter",), args=("by",), source="return redis.call('INCRBY', KEYS.counter, ARGV.by)")


def _connections_named(server, name: str) -> int:
    """How many connections ``server`` (a node or a single Redis) has from clients called ``name``."""
    client = server.client()
    try:
        return sum(1 for c in client.client_list() if c.get("name") == name)
    finally:
        client.close()


async def test_auto_on_a_single_redis_is_the_single_client_for_one_info(redis_server):
    seed = redis_server.client()
    seed.config_resetstat()
    r = connect(Settings(redis_url=redis_server.url))
    try:
        # A pipeline asked for before the first command is replayed on the real one.
        pipe = r.pipeline(transaction=False)
        pipe.get("k")
        pipe.incr("n", 2)
        pipe.time()
        assert (await pipe.execute())[:2] == [None, 2]
        assert await _INCR(r, counter="n", by=3) == 5
        assert [k async for k in r.scan_iter(match="n")] == [b"n"]
        assert type(r.resolved) is aioredis.Redis
        assert r.get.__self__ is r.resolved  # later calls go straight to it
        assert seed.info("commandstats")["cmdstat_info"]["calls"] == 1
    finally:
        await r.aclose()
        seed.close()


@pytest.mark.parametrize("mode", ["off", "auto"])
async def test_aclose_closes_the_single_clients_connections(redis_server, mode, async_wait_until):
    name = f"sluice-closing-{mode}"
    r = connect(Settings(redis_url=f"{redis_server.url}?client_name={name}", redis_cluster=mode), max_connections=4)
    await asyncio.gather(*(r.ping() for _ in range(8)))
    assert _connections_named(redis_server, name) > 0
    await r.aclose()
    await async_wait_until(lambda: _connections_named(redis_server, name) == 0, message="the connections closed")


async def test_on_against_a_single_redis_says_so(redis_server):
    r = connect(Settings(redis_url=redis_server.url, redis_cluster="on"))
    try:
        with pytest.raises(RedisClusterException, match="[Cc]luster mode is not enabled"):
            await r.ping()
    finally:
        await r.aclose()


@pytest.mark.cluster
async def test_auto_on_a_cluster(redis_cluster):
    r = connect(Settings(redis_url=redis_cluster.url), max_connections=8)
    try:
        assert await r.ping()
        assert isinstance(r.resolved, aioredis.RedisCluster)
        # Keys of every master, through the node the URL names.
        keys = [f"k{i}" for i in range(24)]
        assert len({redis_cluster.master_of_key(k).port for k in keys}) == 3
        for k in keys:
            assert await _INCR(r, counter=k, by=1) == 1  # EVALSHA routed by its key; NOSCRIPT -> EVAL
        # Scripts and TIME on a non-transactional pipeline spanning every master.
        pipe = r.pipeline(transaction=False)
        for k in keys:
            _INCR.queue(pipe, counter=k, by=1)
        pipe.time()
        replies = await pipe.execute()
        assert replies[:-1] == [2] * len(keys) and len(replies[-1]) == 2
        # SCRIPT LOAD reaches every master, so EVALSHA then runs anywhere without a fallback.
        await _INCR.load(r)
        redis_cluster.reset_stats()
        for k in keys:
            assert await _INCR(r, counter=k, by=1) == 3
        stats = redis_cluster.commandstats()
        assert sum(s.get("evalsha", {}).get("calls", 0) for s in stats.values()) == len(keys)
        assert not any("eval" in s for s in stats.values()), stats
        # SCAN walks every master.
        assert sorted([k async for k in r.scan_iter(match="k*", count=100)]) == sorted(k.encode() for k in keys)
        # A transaction stays within one slot.
        pipe = r.pipeline(transaction=True)
        pipe.get("{t}a")
        pipe.get("{t}b")
        assert await pipe.execute() == [None, None]
        # Several streams in one XREADGROUP must share a slot: redis-py refuses before sending.
        with pytest.raises(RedisClusterException, match="same key slot"):
            await r.xreadgroup("g", "c", {"{a}s": ">", "{b}s": ">"})
        # A failover: the client follows the slots to the promoted replica; scripts are reloaded.
        victim = redis_cluster.master_of_key("k0")
        redis_cluster.failover(redis_cluster.replica_of(victim))
        assert await _INCR(r, counter="k0", by=1) == 4
    finally:
        await r.aclose()


@pytest.mark.cluster
async def test_a_burst_above_the_cap_waits_for_connections_instead_of_failing(redis_cluster, async_wait_until):
    # redis-py's own cluster client raises MaxConnectionsError as soon as a node's connections are
    # all busy; connect()'s waits. A name on every connection lets each node count the client's.
    cap, name = 4, "sluice-burst"
    r = connect(Settings(redis_url=f"{redis_cluster.url}?client_name={name}"), max_connections=cap)
    keys = [f"k{i}" for i in range(24)]
    assert len({redis_cluster.master_of_key(k).port for k in keys}) == 3
    one_slot = "{burst}n"

    async def pipeline(i: int) -> list:
        pipe = r.pipeline(transaction=False)
        for k in keys[i % 3 :: 3]:  # a pipeline reaches every master at once
            _INCR.queue(pipe, counter=k, by=1)
        pipe.get(keys[i % len(keys)])
        return await pipe.execute()

    try:
        await _INCR.load(r)  # a pipeline's EVALSHA has no EVAL to fall back on
        replies = await asyncio.gather(
            *(_INCR(r, counter=keys[i % len(keys)], by=1) for i in range(300)),
            # A blocking command holds its connection until its timeout.
            *(r.blpop([f"empty{i % len(keys)}"], timeout=0.01) for i in range(100)),
            *(pipeline(i) for i in range(100)),
        )
        assert all(reply is not None for reply in replies[:300]) and replies[300:400] == [None] * 100
        totals = {k: int(await r.get(k)) for k in keys}
        assert sum(totals.values()) == 300 + 100 * 8
        # Every command of one slot: the cap is reached on that node, and not passed.
        assert await asyncio.gather(*(_INCR(r, counter=one_slot, by=1) for _ in range(200)))
        assert int(await r.get(one_slot)) == 200
        counts = {node.port: _connections_named(node, name) for node in redis_cluster.masters()}
        assert counts[redis_cluster.master_of_key(one_slot).port] >= cap, counts
        # The node the URL names has one more: redis-py keeps its first contact with that node
        # apart (a pool of its own, one connection) to ask it for the slot map again.
        first = int(redis_cluster.url.rsplit(":", 1)[1].split("/")[0])
        assert all(n <= cap + (port == first) for port, n in counts.items()), counts
    finally:
        await r.aclose()
    # Every connection closes with the client, the one that asked INFO cluster included.
    masters = redis_cluster.masters()
    await async_wait_until(lambda: sum(_connections_named(m, name) for m in masters) == 0, message="all closed")
