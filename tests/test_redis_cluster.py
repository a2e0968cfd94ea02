"""The local Redis Cluster harness (tests/support/redis_cluster.py) forms a working cluster, fails over
on request and when a master dies, and reports each master's command counts."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(240)]


def test_cluster_forms_serves_and_fails_over(redis_cluster, wait_until):
    assert len(redis_cluster.masters()) == 3 and len(redis_cluster.replicas()) == 3
    for node in redis_cluster.nodes:
        info = node.command("CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info, info

    client = redis_cluster.client()
    try:
        # Keys of different slots land on different masters, all through one client.
        keys = [f"key-{i}" for i in range(30)]
        for k in keys:
            client.set(k, k.upper())
        assert [client.get(k) for k in keys] == [k.upper().encode() for k in keys]
        assert len({redis_cluster.master_of_key(k).port for k in keys}) == 3

        redis_cluster.reset_stats()
        client.get("key-0")
        stats = redis_cluster.commandstats()
        serving = redis_cluster.master_of_key("key-0").name
        assert stats[serving]["get"]["calls"] == 1, stats
        assert all("get" not in s for name, s in stats.items() if name != serving), stats

        # A coordinated failover: the replica takes the slots over with the data.
        master = redis_cluster.master_of_key("key-0")
        replica = redis_cluster.replica_of(master)
        old = redis_cluster.failover(replica)
        assert old.port == master.port
        assert redis_cluster.master_of_key("key-0").port == replica.port
        wait_until(
            lambda: client.get("key-0") == b"KEY-0",
            timeout=30,
            message="key-0 after the failover",
            ignore=(ConnectionError, OSError, _redis_errors()),
        )

        # A master killed outright: its replica is promoted and still has the data.
        victim = redis_cluster.master_of_key("key-1")
        killed, promoted = redis_cluster.kill_master(victim)
        assert killed.port == victim.port and promoted.port != victim.port
        assert redis_cluster.master_of_key("key-1").port == promoted.port
        wait_until(
            lambda: client.get("key-1") == b"KEY-1",
            timeout=30,
            message="key-1 after the kill",
            ignore=(ConnectionError, OSError, _redis_errors()),
        )
        client.set("after-kill", "1")
        assert client.get("after-kill") == b"1"
    finally:
        client.close()


def _redis_errors():
    import redis

    return redis.RedisError
