"""The single-Redis client packs commands itself (service/core/connections.py): the same bytes as redis-py."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import DataError

from service.core.config import Settings
from service.core.connections import connect

RESULT = b'{"custom_id":"req-1","response":{"status_code":200,"body":{"usage":{"total_tokens":15}}},"error":null}'
COMMANDS = [
    ("PING",),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"x"),
    ("SET", "k", "v\u00e9\u4e2d", "PX", 1500),
    ("EVALSHA", "a" * 40, 2, "sluice:{b}:done", "sluice:{b}:results", 0.1, 0.5, -7, 1.0e20, 2**70),
    ("EVALSHA", "b" * 40, 1, "k", *[x for i in range(60) for x in (i, f"{i}-1", "completed", RESULT)]),
    ("SET", "big", b"x" * 100_000),
    ("SET", "view", memoryview(b"y" * 10)),
    ("SET", "array", bytearray(b"z" * 7000), "EX", 5),
    ("MSET", *[f"k{i}" for i in range(3000)]),
    ("SET", "empty", b""),
]


@pytest.fixture
async def client():
    r = connect(Settings(redis_url="redis://127.0.0.1:1/0", redis_cluster="off"))
    yield r
    await r.aclose()


def _wire(connection: Connection, args: tuple) -> bytes:
    return b"".join(bytes(piece) for piece in connection.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]) + f"/{len(a)}")
def test_the_same_bytes_as_redis_py(client, args):
    pool = client.connection_pool
    ours = pool.connection_class(**pool.connection_kwargs)
    theirs = Connection(**pool.connection_kwargs)
    assert isinstance(ours, Connection)
    assert _wire(ours, args) == _wire(theirs, args)


def test_pieces_stay_below_the_cutoff_unless_one_argument_is_larger(client):
    pool = client.connection_pool
    ours = pool.connection_class(**pool.connection_kwargs)
    pieces = ours.pack_command("MSET", *[f"key{i}" for i in range(5000)])
    cutoff = ours._buffer_cutoff
    assert len(pieces) > 1
    assert all(len(p) <= 2 * cutoff for p in pieces)
    big = b"x" * (cutoff * 3)
    assert any(p is big for p in ours.pack_command("SET", "k", big))


def test_a_bool_is_refused_as_by_redis_py(client):
    pool = client.connection_pool
    with pytest.raises(DataError):
        pool.connection_class(**pool.connection_kwargs).pack_command("SET", "k", True)


async def test_tls_keeps_its_connection_class():
    r = connect(Settings(redis_url="rediss://127.0.0.1:1/0", redis_cluster="off"))
    try:
        assert issubclass(r.connection_pool.connection_class, SSLConnection)
        assert type(r) is aioredis.Redis
    finally:
        await r.aclose()
