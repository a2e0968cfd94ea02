"""``SLUICE_REDIS_CLUSTER`` and the clients ``connect()`` builds for it, without a server.

A real single Redis and a real cluster are in tests/integration/test_redis_cluster_connect.py.
"""

from __future__ import annotations

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

from service.core.config import ConfigError, Settings
from service.core.connections import connect, is_cluster


@pytest.mark.parametrize("raw, mode", [("", "auto"), ("auto", "auto"), (" ON ", "on"), ("off", "off")])
def test_the_setting(raw, mode):
    assert Settings.from_env({"SLUICE_REDIS_CLUSTER": raw}).redis_cluster == mode


def test_a_bad_setting_is_refused():
    with pytest.raises(ConfigError, match="SLUICE_REDIS_CLUSTER"):
        Settings.from_env({"SLUICE_REDIS_CLUSTER": "yes"})


async def test_off_is_the_single_redis_client_as_before():
    r = connect(Settings(redis_url="redis://:pw@127.0.0.1:1/0", redis_cluster="off"))
    try:
        assert type(r) is aioredis.Redis
        assert r.connection_pool.connection_kwargs["password"] == "pw"
    finally:
        await r.aclose()


async def test_on_builds_a_cluster_client_with_the_same_tls_password_and_timeouts():
    r = connect(Settings(redis_url="rediss://:pw@127.0.0.1:1/0", redis_cluster="on"), max_connections=7)
    try:
        assert isinstance(r, aioredis.RedisCluster)
        kwargs = r.connection_kwargs
        assert kwargs["password"] == "pw" and kwargs["connection_class"] is SSLConnection
        assert kwargs["ssl_cert_reqs"] == "none"  # as tls_options gives a single Redis
        assert kwargs["socket_timeout"] == 30.0 and kwargs["socket_connect_timeout"] == 5.0
        assert kwargs["max_connections"] == 7
        assert r.retry.get_retries() == 3
    finally:
        await r.aclose()


async def test_stream_reads_are_routed_without_asking_a_node_for_their_keys():
    # XREADGROUP's keys move, so redis-py would ask a node (COMMAND GETKEYS) for every read; the
    # client at 127.0.0.1:1 has no node to ask, so an answer here is worked out locally.
    from redis.crc import key_slot
    from redis.exceptions import RedisClusterException

    from service.core import keys

    r = connect(Settings(redis_url="redis://127.0.0.1:1/0", redis_cluster="on"))
    shard = keys.shard_of("batch_0000000000000000000000000000000a")
    a, b = keys.lines("batch_0000000000000000000000000000000a"), keys.lines("batch_1000000000000000000000000000000a")
    try:
        args = ("GROUP", "g", "me", "COUNT", 3, "BLOCK", 10, "STREAMS", a, b, ">", ">")
        assert await r._determine_slot("XREADGROUP", *args) == key_slot(keys.active_batches(shard).encode())
        assert await r._determine_slot("XREAD", "COUNT", 1, "STREAMS", a.encode(), "0") == key_slot(a.encode())
        other = keys.lines("batch_0000000000000000000000000000000b")
        with pytest.raises(RedisClusterException, match="same key slot"):
            await r._determine_slot("XREADGROUP", "GROUP", "g", "me", "STREAMS", a, other, ">", ">")
    finally:
        await r.aclose()


def test_a_cluster_has_one_database():
    from redis.exceptions import RedisClusterException

    with pytest.raises(RedisClusterException, match="db"):
        connect(Settings(redis_url="redis://127.0.0.1:1/2", redis_cluster="on"))


async def test_auto_keeps_the_single_client_until_asked_and_its_attributes_meanwhile():
    r = connect(Settings(redis_url="redis://:pw@127.0.0.1:1/0"))
    try:
        # Nothing has been sent: the single client's own settings are there to read.
        assert r.connection_pool.connection_kwargs["password"] == "pw"
    finally:
        await r.aclose()


async def test_a_server_that_refuses_info_is_taken_for_a_single_redis():
    r = fakeredis.FakeAsyncRedis()  # answers INFO with "unknown command"
    try:
        assert await is_cluster(r) is False
    finally:
        await r.aclose()
