"""The lease primitive (service/core/leases.py) and the writes it fences.

A stale holder (its lease expired and was taken over, as after a long pause) must have every
write refused and change nothing; a call redis-py sends twice (its reply was lost after the
command ran) must do no more than once. The lost replies are real: a TCP proxy in front of a real
redis-server drops one reply and closes the connection, and the client's own Retry re-sends.
"""

from __future__ import annotations

import asyncio
import contextlib

import fakeredis
import pytest

from service.core import keys, leases, store, streams
from service.core.config import Settings
from service.core.connections import connect
from service.core.leases import LeaseLost
from service.core.records import FileRecord
from service.core.storage import LocalStorage

LEASE = keys.finalizer("batch_x")
# A key in the lease's slot, as every key a fenced write touches must be.
K = LEASE + ":k"


@pytest.fixture
def r():
    return fakeredis.FakeAsyncRedis()


async def _stolen(r, lease: leases.Lease, thief: str = "peer") -> leases.Lease:
    """What a pause past the lease leads to: it expires and a peer takes it (a larger token)."""
    await r.delete(lease.key)
    taken = await leases.take(r, lease.key, thief, 10_000)
    assert taken is not None and taken.token > lease.token
    return taken


# ----------------------------------------------------------------------------- the primitive
async def test_take_renew_drop(r):
    first = await leases.take(r, LEASE, "a", 10_000)
    assert first is not None and first.holder == "a"
    assert await leases.take(r, LEASE, "b", 10_000) is None  # held
    # The holder taking it again (a re-sent call) keeps its token: no second INCR.
    assert await leases.take(r, LEASE, "a", 10_000) == first
    assert int(await r.get(keys.lease_seq(LEASE))) == first.token
    assert await leases.renew(r, first, 10_000) and await leases.renew(r, first, 10_000)
    await leases.drop(r, first)
    await leases.drop(r, first)
    second = await leases.take(r, LEASE, "b", 10_000)
    assert second is not None and second.token > first.token
    await leases.drop(r, first)  # not its lease any more: nothing happens
    assert leases.holder_of(await r.get(LEASE)) == "b"


async def test_an_expired_lease_is_never_renewed_back(r):
    lease = await leases.take(r, LEASE, "a", 10_000)
    await r.delete(LEASE)  # expired while its holder was paused
    assert not await leases.renew(r, lease, 10_000)
    assert await r.get(LEASE) is None, "a renewal resurrected an expired lease"
    peer = await _stolen(r, lease)
    assert await leases.renew_many(r, [lease, peer], 10_000) == [lease]
    assert leases.holder_of(await r.get(LEASE)) == "peer"


async def test_take_many(r):
    other = await leases.take(r, keys.finalizer("b2"), "b", 10_000)
    got = await leases.take_many(r, [keys.finalizer("b1"), keys.finalizer("b2")], "a", 10_000)
    assert got[0] is not None and got[0].holder == "a" and got[1] is None
    # Each lease draws from its own slot's counter: tokens order one lease's holders, not all leases.
    assert other is not None and got[0].token == int(await r.get(keys.lease_seq(keys.finalizer("b1"))))


async def test_a_stale_holders_writes_are_refused(r):
    lease = await leases.take(r, LEASE, "a", 10_000)
    assert await leases.execute(r, lease, ("SET", K, "mine"), ("GET", K)) == [b"OK", b"mine"]
    peer = await _stolen(r, lease)
    with pytest.raises(LeaseLost, match="FENCED"):
        await leases.execute(r, lease, ("SET", K, "stale"))
    assert await r.get(K) == b"mine"
    await leases.execute(r, peer, ("SET", K, "peer's"))
    assert await r.get(K) == b"peer's"
    # The same stale lease stays refused even once the key is free again.
    await leases.drop(r, peer)
    with pytest.raises(LeaseLost):
        await leases.execute(r, lease, ("SET", K, "stale"))


async def test_fenced_store_writes(r):
    """transition, record_results, create_file and release all refuse a stale lease and change nothing."""
    batch_id = "batch_x"
    await r.hset(
        keys.batch(batch_id),
        mapping={
            "id": batch_id,
            "status": "in_progress",
            "owner": "o",
            "input_file_id": "file-in",
            "input_key": "file-in",
            "reserved_lines": 3,
        },
    )
    await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "seed", streams.RESULT_OUTCOME: "completed"})
    await r.hset(keys.owner_usage("o"), mapping={"active_batches": 1, "enqueued_lines": 3})
    lease = await leases.take(r, keys.finalizer(batch_id), "a", 10_000)
    await _stolen(r, lease)
    before = {k: await r.dump(k) for k in await r.keys("*") if k != keys.lease_seq(keys.finalizer(batch_id)).encode()}

    with pytest.raises(LeaseLost):
        await store.transition(r, batch_id, allowed=["in_progress"], fields={"status": "finalizing"}, lease=lease)
    with pytest.raises(LeaseLost):
        await store.record_results(r, batch_id, [(0, "", "completed", b"{}")], lease=lease)
    with pytest.raises(LeaseLost):
        await store.create_file(
            r,
            owner="o",
            file_id="file-out",
            seq=1,
            filename="x",
            purpose="batch_output",
            size=10,
            storage_key="x",
            expires_at=None,
            lease=lease,
        )
    with pytest.raises(LeaseLost):
        await store.release(r, None, await store.get_batch_record(r, batch_id), lease=lease)
    after = {k: await r.dump(k) for k in await r.keys("*") if k != keys.lease_seq(keys.finalizer(batch_id)).encode()}
    assert after == before


# ----------------------------------------------------------------------------- lost replies
class DropOneReply:
    """A TCP proxy to Redis that, once armed, lets the next command carrying ``marker`` run but
    drops its reply and closes the connection: redis-py's Retry then sends the command again."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.marker: bytes | None = None
        self.dropped = 0
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "DropOneReply":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def arm(self, marker: bytes) -> None:
        self.marker = marker

    async def _serve(self, client_reader, client_writer) -> None:
        self.tasks.add(asyncio.current_task())
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        doomed = asyncio.Event()

        async def up() -> None:
            while data := await client_reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    doomed.set()
                redis_writer.write(data)
                await redis_writer.drain()

        async def down() -> None:
            while data := await redis_reader.read(65536):
                if doomed.is_set():
                    self.dropped += 1
                    return
                client_writer.write(data)
                await client_writer.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_writer, redis_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


@pytest.fixture
async def proxied(redis_server):
    async with DropOneReply(redis_server.port) as proxy:
        client = connect(Settings.from_env({"REDIS_URL": proxy.url}), max_connections=2)
        try:
            yield proxy, client
        finally:
            await client.aclose()


async def test_a_re_sent_take_or_renew_is_harmless(proxied):
    proxy, r = proxied
    await leases.take(r, "sluice:warm", "w", 10_000)  # the scripts are loaded: EVALSHA runs them
    proxy.arm(b"EVALSHA")
    lease = await leases.take(r, LEASE, "a", 10_000)
    assert proxy.dropped == 1, "the reply was not dropped: nothing was re-sent"
    assert lease is not None and await r.get(LEASE) == lease.value.encode()
    assert int(await r.get(keys.lease_seq(lease.key))) == lease.token == 1, "the re-sent take drew a second token"
    proxy.arm(b"EVALSHA")
    assert await leases.renew(r, lease, 10_000)
    assert proxy.dropped == 2
    assert await r.get(LEASE) == lease.value.encode()


async def test_re_sent_fenced_writes_do_no_more_than_once(proxied, tmp_path):
    proxy, r = proxied
    storage = LocalStorage(tmp_path)
    for batch_id, owner in (("batch_w1", "w"), ("batch_x2", "o")):
        await r.hset(
            keys.batch(batch_id),
            mapping={
                "id": batch_id,
                "status": "in_progress",
                "owner": owner,
                # In the batch's shard, as a batch's input file always is.
                "input_file_id": f"file-in{batch_id[-1]}",
                "input_key": "file-in",
                "reserved_lines": 3,
            },
        )
        await r.hset(keys.owner_usage(owner), mapping={"active_batches": 1, "enqueued_lines": 3})
        await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "seed", streams.RESULT_OUTCOME: "completed"})
    warm = await leases.take(r, keys.finalizer("batch_w1"), "a", 10_000)
    lease = await leases.take(r, keys.finalizer("batch_x2"), "a", 10_000)

    async def file_out(file_id: str, owner: str, the_lease) -> None:
        await store.create_file(
            r,
            owner=owner,
            file_id=file_id,
            seq=1,
            filename="out",
            purpose="batch_output",
            size=10,
            storage_key="out",
            expires_at=None,
            lease=the_lease,
        )

    # Every script runs once first (on other keys), so that the armed calls run by EVALSHA.
    await store.record_results(r, "batch_w1", [(0, "", "completed", b"{}")], lease=warm)
    await file_out("file-w1", "w", warm)
    await store.delete_file(r, FileRecord.from_hash(await r.hgetall(keys.file("file-w1"))), store.new_op_id())
    await store.transition(r, "batch_w1", allowed=["in_progress"], fields={"status": "finalizing"}, lease=warm)
    await store.release(r, storage, await store.get_batch_record(r, "batch_w1"), lease=warm)

    async def once(call) -> None:
        proxy.arm(b"EVALSHA")
        dropped = proxy.dropped
        await call
        assert proxy.dropped == dropped + 1, "no reply was dropped: nothing was re-sent"

    await once(store.record_results(r, "batch_x2", [(0, "", "completed", b"{}")], lease=lease))
    assert await r.hget(keys.batch("batch_x2"), "completed") == b"1"
    await once(file_out("file-out2", "o", lease))
    assert await store.usage(r, "o", "stored_bytes") == 10
    await once(store.delete_file(r, FileRecord.from_hash(await r.hgetall(keys.file("file-out2"))), store.new_op_id()))
    assert await store.usage(r, "o", "stored_bytes") == 0, "the re-sent delete gave the bytes back twice"
    proxy.arm(b"EVALSHA")
    applied, _ = await store.transition(
        r, "batch_x2", allowed=["in_progress"], fields={"status": "finalizing"}, lease=lease
    )
    assert applied and proxy.dropped == 4, "the re-sent transition must still count as applied"
    assert await r.hget(keys.batch("batch_x2"), "status") == b"finalizing"
    await once(store.release(r, storage, await store.get_batch_record(r, "batch_x2"), lease=lease))
    assert await store.usage(r, "o", "active_batches") == 0
    assert await store.usage(r, "o", "enqueued_lines") == 0


# ----------------------------------------------------------------------------- local files
async def test_a_stale_local_append_neither_truncates_nor_leaves_holes(tmp_path):
    storage = LocalStorage(tmp_path)
    key = "batch_x_output.jsonl"
    lines = [f'{{"line": {i}}}\n'.encode() for i in range(6)]
    offset = await storage.append(key, lines[0] + lines[1], 0, token=1)
    stale_offset, stale_data = offset, lines[2] + lines[3]
    # The newer holder (token 2) appends from the same committed offset, and on.
    newer = await storage.append(key, lines[2] + lines[3], offset, token=2)
    newer = await storage.append(key, lines[4] + lines[5], newer, token=2)
    # The stale holder resumes and writes what it had read: the same bytes, at the same place.
    await storage.append(key, stale_data, stale_offset, token=1)
    content = b"".join([c async for c in storage.read(key)])
    assert content == b"".join(lines) and await storage.size(key) == newer
    with pytest.raises(ValueError):
        await storage.append(key, b"gap", newer + 5, token=3)  # would leave NUL bytes
    assert b"\x00" not in b"".join([c async for c in storage.read(key)])
