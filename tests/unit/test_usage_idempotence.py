"""Every script that moves a usage counter or a provider limit is safe to run twice.

redis-py re-sends a command whose reply was lost (after it ran), so each operation carries an id
fixed before its first send and the script records it in the same atomic step: running the same
operation again changes no counter and answers the same. On fakeredis (with Lua).
"""

from __future__ import annotations

import fakeredis
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.core import keys, store
from service.core.config import Provider
from service.core.records import BatchRecord, FileRecord
from service.web import appkeys
from workers import limits

from .conftest import TOKEN_A, good_jsonl

OWNER = "o" * 32
FIELDS = ("active_batches", "enqueued_lines", "stored_bytes")


@pytest.fixture
async def r():
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


async def usage(r, owner: str = OWNER) -> dict[str, int]:
    values = await r.hmget(keys.owner_usage(owner), *FIELDS)
    return {name: int(v or 0) for name, v in zip(FIELDS, values)}


async def new_file(
    r, file_id: str, size: int, *, limit: int | None = 10_000, expires_at: int | None = None, owner: str = OWNER
):
    return await store.create_file(
        r,
        owner=owner,
        file_id=file_id,
        seq=store.seq_of(file_id) or 1,
        filename="f.jsonl",
        purpose="batch",
        size=size,
        storage_key=file_id,
        expires_at=expires_at,
        max_stored_bytes=limit,
    )


async def new_batch(r, batch_id: str, lines: int, *, max_active: int = 3, max_lines: int = 100, owner: str = OWNER):
    return await store.create_batch(
        r,
        owner=owner,
        batch_id=batch_id,
        seq=store.seq_of(batch_id) or 1,
        endpoint="/v1/chat/completions",
        input_file_id="file-000000000001aaaaaaaaaaaa",
        input_key="k",
        completion_window="24h",
        window_s=86400,
        metadata=None,
        output_expires_after=None,
        reserved_lines=lines,
        max_active_batches=max_active,
        max_enqueued_lines=max_lines,
    )


def fid(n: int) -> str:
    return f"file-{n:012x}aaaaaaaaaaaa"


def bid(n: int) -> str:
    # In the shard of its input file (fid's last digit), as every batch is.
    return f"batch_{n:012x}bbbbbbbbbbba"


# --------------------------------------------------------------------------------------------
# Files


async def test_create_file_twice_charges_once(r):
    first = await new_file(r, fid(1), 700)
    again = await new_file(r, fid(1), 700)
    assert first == again
    assert await usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 700}
    assert await r.zrange(keys.owner_files(OWNER), 0, -1) == [fid(1).encode()]


async def test_create_file_refused_answers_the_same_on_a_rerun(r):
    await new_file(r, fid(1), 6_000)
    with pytest.raises(store.QuotaExceeded) as e:
        await new_file(r, fid(2), 6_000)
    assert e.value.field == "stored_bytes"
    # Room appears before the re-run: the re-run still answers what the first run answered.
    await store.delete_file(r, FileRecord.from_hash(await r.hgetall(keys.file(fid(1)))), store.new_op_id())
    with pytest.raises(store.QuotaExceeded):
        await new_file(r, fid(2), 6_000)
    assert await r.exists(keys.file(fid(2))) == 0
    assert await usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}


async def test_result_file_registered_again_is_charged_once(r):
    """The finalizer registers a result file again after a retry: no limit, charged once."""
    for _ in range(3):
        await new_file(r, fid(3), 50_000, limit=None, expires_at=store.now() + 3600)
    assert (await usage(r))["stored_bytes"] == 50_000
    assert await r.zcard(keys.file_expiry(keys.shard_of(fid(3)))) == 1


async def test_delete_file_resent_gives_bytes_back_once(r):
    await new_file(r, fid(1), 700)
    await new_file(r, fid(2), 300)
    h = FileRecord.from_hash(await r.hgetall(keys.file(fid(1))))
    op = store.new_op_id()
    assert (await store.delete_file(r, h, op))[0]
    assert (await store.delete_file(r, h, op))[0]  # the same script, re-sent after its reply was lost
    assert (await usage(r))["stored_bytes"] == 300


async def test_expired_record_uncharged_once(r, tmp_path):
    """A file whose record expired on its own: the sweep gives its bytes back once, however often it runs."""
    from service.core.storage import LocalStorage

    storage = LocalStorage(tmp_path)
    await new_file(r, fid(1), 900, expires_at=store.now() + 3600)
    member = store.expiry_member(fid(1), fid(1), OWNER, 900)
    await r.delete(keys.file(fid(1)))  # its record expired
    await r.zadd(keys.file_expiry(keys.shard_of(fid(1))), {member: 1})  # and it is due
    assert await store.sweep_expired_files(r, storage) == 1
    assert await store.sweep_expired_files(r, storage) == 0
    assert (await usage(r))["stored_bytes"] == 0


# --------------------------------------------------------------------------------------------
# Batches


async def test_create_batch_twice_reserves_once(r, monkeypatch):
    # One clock for both calls, as for a command redis-py re-sends: a second boundary between them
    # would only change created_at in the answer.
    monkeypatch.setattr(store, "now", lambda: 1_800_000_000)
    first = await new_batch(r, bid(1), 7)
    # Meanwhile the publisher moved it on: the re-run must not write the record over it.
    await r.hset(keys.batch(bid(1)), "status", "in_progress")
    again = await new_batch(r, bid(1), 7)
    assert first == again
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 7, "stored_bytes": 0}
    assert (await r.hget(keys.batch(bid(1)), "status")) == b"in_progress"


async def test_create_batch_refused_answers_the_same_on_a_rerun(r):
    await new_batch(r, bid(1), 1, max_active=1)
    for _ in range(2):
        with pytest.raises(store.QuotaExceeded) as e:
            await new_batch(r, bid(2), 1, max_active=1)
        assert e.value.field == "active_batches"
    with pytest.raises(store.QuotaExceeded) as e:
        await new_batch(r, bid(3), 200)
    assert e.value.field == "enqueued_lines"
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 1, "stored_bytes": 0}
    assert await r.exists(keys.batch(bid(2)), keys.batch(bid(3))) == 0


async def test_release_twice_gives_back_once(r, tmp_path):
    from service.core.storage import LocalStorage

    storage = LocalStorage(tmp_path)
    h = await new_batch(r, bid(1), 4)
    await new_batch(r, bid(2), 5)
    await store.release(r, storage, h)
    await store.release(r, storage, h)
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 5, "stored_bytes": 0}
    # A release after the record's retention ended gives nothing back, and recreates nothing.
    await r.delete(keys.batch(bid(2)))
    await store.release(r, storage, msgspec.structs.replace(h, id=bid(2)))
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 5, "stored_bytes": 0}
    assert await r.exists(keys.batch(bid(2))) == 0


async def test_settle_before_and_after(r):
    # Settled before it ran: it never will (a late copy changes nothing).
    assert await store.settle(r, OWNER, bid(1)) is None
    assert await store.settle(r, OWNER, bid(1)) is None
    with pytest.raises(RuntimeError):
        await new_batch(r, bid(1), 3)
    assert await r.exists(keys.batch(bid(1))) == 0
    # Settled after it ran: its answer.
    await new_batch(r, bid(2), 3)
    assert await store.settle(r, OWNER, bid(2)) == ""
    with pytest.raises(store.QuotaExceeded):
        await new_batch(r, bid(3), 3, max_active=1)
    assert await store.settle(r, OWNER, bid(3)) == "active_batches"
    assert await usage(r) == {"active_batches": 1, "enqueued_lines": 3, "stored_bytes": 0}


# --------------------------------------------------------------------------------------------
# The audit's write


async def test_audit_apply_twice_applies_once(r):
    await r.hset(keys.owner_usage(OWNER), mapping={"active_batches": 5, "rev": 9})
    args = dict(op_ttl=60, rev=9, counters=["active_batches", 5, 2, "enqueued_lines", 0, 0, "stored_bytes", 0, 0])
    op = keys.owner_op(OWNER, "audit-1")
    assert await store._AUDIT_APPLY(r, usage=keys.owner_usage(OWNER), op=op, **args) == 1
    # Its own write is not mistaken for a move.
    assert await store._AUDIT_APPLY(r, usage=keys.owner_usage(OWNER), op=op, **args) == 1
    assert await r.hmget(keys.owner_usage(OWNER), "active_batches", "rev") == [b"2", b"10"]
    # Read before a move: not applied.
    stale = keys.owner_op(OWNER, "audit-2")
    assert await store._AUDIT_APPLY(r, usage=keys.owner_usage(OWNER), op=stale, **args) == 0
    assert await r.hget(keys.owner_usage(OWNER), "active_batches") == b"2"


# --------------------------------------------------------------------------------------------
# Provider limits


async def test_acquire_twice_takes_one_token_and_one_slot(r):
    capped = Provider(name="capped", base_url="http://x", max_concurrency=1, rpm=60_000)
    now = 1_000_000
    await r.hset(keys.provider_bucket("capped"), mapping={"r": 3, "t": 0, "ts": now})
    for _ in range(2):
        assert await limits.acquire(r, capped, "b/1-0", 1, lease_ms=5000, op_id="op1", now_ms=now) == -1
    assert await r.zrange(keys.provider_inflight("capped"), 0, -1) == [b"b/1-0"]
    assert float(await r.hget(keys.provider_bucket("capped"), "r")) == pytest.approx(2)
    # With the only slot taken, another line waits.
    assert await limits.acquire(r, capped, "b/1-1", 1, lease_ms=5000, op_id="op2", now_ms=now) > 0


async def test_acquire_without_lease_twice_takes_one_token(r):
    # Without adaptive concurrency a rate-only provider admits without leases.
    rated = Provider(name="rated", base_url="http://x", rpm=60_000, adaptive=False)
    now = 2_000_000
    await r.hset(keys.provider_bucket("rated"), mapping={"r": 3, "t": 0, "ts": now})
    for _ in range(2):
        assert await limits.acquire(r, rated, "b/2-0", 1, lease_ms=5000, op_id="op1", now_ms=now) == 0
    assert float(await r.hget(keys.provider_bucket("rated"), "r")) == pytest.approx(2)
    assert await limits.acquire(r, rated, "b/2-0", 1, lease_ms=5000, op_id="op2", now_ms=now) == 0
    assert float(await r.hget(keys.provider_bucket("rated"), "r")) == pytest.approx(1)
    assert await r.zcard(keys.provider_inflight("rated")) == 0


# --------------------------------------------------------------------------------------------
# Webhook attempts


async def test_webhook_attempt_counted_once(r):
    from service.core import webhooks

    await r.hset(keys.batch(bid(1)), mapping={"status": "completed", "webhook_attempts": 2})
    for _ in range(2):  # the bump, and its re-run after a lost reply
        assert await webhooks._BUMP(r, batch=keys.batch(bid(1)), counted=2) == 3
    assert await r.hget(keys.batch(bid(1)), "webhook_attempts") == b"3"
    assert await webhooks._BUMP(r, batch=keys.batch(bid(2)), counted=0) == 0  # record gone: nothing made
    assert await r.exists(keys.batch(bid(2))) == 0


# --------------------------------------------------------------------------------------------
# Through the API: a call whose every retry lost its reply


class LoseReplies:
    """Stands in for a Script: runs it (or not), then fails as if every retry's reply was lost."""

    def __init__(self, script, *, run: bool, times: int = 1) -> None:
        self.script, self.run, self.times = script, run, times

    async def __call__(self, r, **params):
        if self.times <= 0:
            return await self.script(r, **params)
        self.times -= 1
        if self.run:
            await self.script(r, **params)
        raise RedisConnectionError("Connection closed by server.")


async def _usage_of(api) -> dict[str, int]:
    return await usage(api.client.app[appkeys.REDIS], store.owner_of(TOKEN_A))


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
async def test_batch_creation_whose_reply_was_lost(api, monkeypatch, ran):
    f = await api.upload_ok()
    monkeypatch.setattr(store, "_CREATE_BATCH", LoseReplies(store._CREATE_BATCH, run=ran))
    resp = await api.create_batch(f["id"])
    listed = (await api.request("GET", "/v1/batches")).ok()["data"]
    if ran:
        # Settled as created: the client gets its batch, not a 503 that would make it create another.
        assert [b["id"] for b in listed] == [resp.ok()["id"]]
        assert (await _usage_of(api))["active_batches"] == 1
    else:
        resp.error(503, code="service_unavailable", type="server_error")
        assert listed == []
        assert (await _usage_of(api))["active_batches"] == 0


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
async def test_upload_whose_reply_was_lost(api, monkeypatch, ran):
    monkeypatch.setattr(store, "_CREATE_FILE", LoseReplies(store._CREATE_FILE, run=ran))
    data = good_jsonl()
    resp = await api.upload(data)
    listed = (await api.list_files()).ok()["data"]
    if ran:
        f = resp.ok()
        assert [x["id"] for x in listed] == [f["id"]]
        assert (await api.request("GET", f"/v1/files/{f['id']}/content")).body == data
        assert api.storage.stored_files() == [f["id"]]
        assert (await _usage_of(api))["stored_bytes"] == len(data)
    else:
        resp.error(503, code="service_unavailable", type="server_error")
        assert listed == []
        assert api.storage.stored_files() == []  # no content left behind
        assert (await _usage_of(api))["stored_bytes"] == 0


async def test_upload_refused_by_quota_holds_nothing(make_api):
    from service.core.config import Quotas

    data = good_jsonl()
    api = await make_api(quotas=Quotas(max_stored_bytes=len(data) * 2 - 1))
    await api.upload_ok(data)
    (await api.upload(data)).error(429, code="storage_quota_exceeded", type="insufficient_quota")
    assert (await _usage_of(api))["stored_bytes"] == len(data)
    assert len(api.storage.stored_files()) == 1


# --------------------------------------------------------------------------------------------
# The audit


@pytest.fixture
def logs(monkeypatch):
    import structlog
    from structlog.testing import capture_logs

    with capture_logs() as captured:
        # A fresh logger: one bound before the capture started would bypass it.
        monkeypatch.setattr(store, "log", structlog.get_logger("sluice.store"))
        yield captured


async def _records_for_audit(r, owner: str = OWNER) -> None:
    """Files of 700 and 300 bytes, one of 200 whose record expired (the sweep has not run yet),
    a running batch of 4 lines, and one of 2 lines that ended without giving its quota back."""
    await new_file(r, fid(1), 700, owner=owner)
    await new_file(r, fid(2), 300, owner=owner)
    await new_file(r, fid(3), 200, owner=owner, expires_at=store.now() - 5)
    await new_batch(r, bid(1), 4, owner=owner)
    await new_batch(r, bid(2), 2, owner=owner)
    await r.hset(keys.batch(bid(2)), "status", "completed")


async def test_audit_repairs_planted_drift_and_logs_it(r, tmp_path, logs):
    from service.core.storage import LocalStorage

    await _records_for_audit(r)
    assert await r.exists(keys.file(fid(3))) == 0
    exact = {"active_batches": 1, "enqueued_lines": 4, "stored_bytes": 1200}
    await r.hincrby(keys.owner_usage(OWNER), "active_batches", 5)
    await r.hincrby(keys.owner_usage(OWNER), "stored_bytes", -3000)
    await r.hincrby(keys.owner_usage(OWNER), "enqueued_lines", 1)
    drifted = await usage(r)

    assert await store.audit_usage(r, LocalStorage(tmp_path), "auditor-1") == 1
    assert await usage(r) == exact
    assert await r.hget(keys.batch(bid(2)), "released") == b"1"
    repaired = [e for e in logs if e["event"] == "usage_repaired"]
    assert len(repaired) == 1, logs
    # Before: what was found once the ended batch had given its quota back (1 batch, 2 lines).
    assert repaired[0]["before"] == {
        **drifted,
        "active_batches": drifted["active_batches"] - 1,
        "enqueued_lines": drifted["enqueued_lines"] - 2,
    }
    assert repaired[0]["after"] == exact and repaired[0]["owner"] == OWNER
    assert await r.exists(keys.USAGE_AUDIT_LOCK) == 0  # given up at the end

    # Nothing left to repair: no write, no log.
    rev = await r.hget(keys.owner_usage(OWNER), "rev")
    assert await store.audit_usage(r, LocalStorage(tmp_path), "auditor-1") == 0
    assert await r.hget(keys.owner_usage(OWNER), "rev") == rev
    assert len([e for e in logs if e["event"] == "usage_repaired"]) == 1


async def test_audit_leaves_exact_counters_alone(r, tmp_path, logs):
    from service.core.storage import LocalStorage

    await _records_for_audit(r)
    await store.release(r, LocalStorage(tmp_path), BatchRecord.from_hash(await r.hgetall(keys.batch(bid(2)))))
    before = await r.hgetall(keys.owner_usage(OWNER))
    assert await store.audit_usage(r, LocalStorage(tmp_path), "auditor-1") == 0
    assert await r.hgetall(keys.owner_usage(OWNER)) == before
    assert not [e for e in logs if e["event"] == "usage_repaired"]


async def test_audit_runs_in_one_process_at_a_time(r, tmp_path):
    from service.core.storage import LocalStorage

    await new_batch(r, bid(1), 4)
    await r.hincrby(keys.owner_usage(OWNER), "active_batches", 3)
    from service.core import leases

    assert await leases.take(r, keys.USAGE_AUDIT_LOCK, "auditor-1", 60_000) is not None
    assert await store.audit_usage(r, LocalStorage(tmp_path), "auditor-2") == 0
    assert (await usage(r))["active_batches"] == 4


async def test_audit_does_not_undo_a_concurrent_reservation(r, tmp_path, monkeypatch):
    """A batch created while the audit recounts (after its read, before its write) stays counted."""
    from service.core.storage import LocalStorage

    await new_batch(r, bid(1), 4)
    await r.hincrby(keys.owner_usage(OWNER), "stored_bytes", 999)  # drift to repair
    real = store._recount
    calls = []

    async def recount_then_reserve(r_, owner, *rest):
        counted = await real(r_, owner, *rest)
        calls.append(counted)
        if len(calls) == 1:
            await new_batch(r, bid(2), 3)  # lands after the recount, before the repair
        return counted

    monkeypatch.setattr(store, "_recount", recount_then_reserve)
    assert await store.audit_usage(r, LocalStorage(tmp_path), "auditor-1") == 1
    assert len(calls) == 2, "the repair read before the reservation was applied"
    assert await usage(r) == {"active_batches": 2, "enqueued_lines": 7, "stored_bytes": 0}


# --------------------------------------------------------------------------------------------
# An ending interrupted between its terminal transition and its release


async def test_finalizer_releases_a_batch_whose_finish_was_interrupted(r, tmp_path):
    from service.core.config import Settings
    from service.core.storage import LocalStorage
    from workers.finalizer import Finalizer

    fin = Finalizer(Settings(data_dir=tmp_path), LocalStorage(tmp_path))
    fin.redis = r
    await new_batch(r, bid(1), 4)
    # The transition ran (it leaves the batch live until released), then the finalizer died.
    await store.transition(
        r,
        bid(1),
        allowed=["validating"],
        fields={"status": "completed"},
        remove_from=[keys.active_batches],
        expire_s=3600,
    )
    await r.sadd(keys.live_batches(keys.shard_of(bid(1))), bid(1))
    from service.core import leases

    await fin.advance(bid(1), await leases.take(r, keys.finalizer(bid(1)), fin.name, 10_000))
    assert await usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}
    assert await r.sismember(keys.live_batches(keys.shard_of(bid(1))), bid(1)) == 0


async def test_publisher_releases_a_batch_whose_ending_was_interrupted(r, tmp_path):
    import asyncio

    from service.core.config import Settings
    from service.core.storage import LocalStorage
    from service.web.publisher import Publisher

    pub = Publisher(r, LocalStorage(tmp_path), Settings(data_dir=tmp_path), asyncio.Event())
    await new_batch(r, bid(1), 4)
    # Failed validation (or cancelled before it started), then the web process died: still queued.
    await store.transition(r, bid(1), allowed=["validating"], fields={"status": "failed"}, expire_s=3600)
    from service.core import leases

    await pub.process(bid(1), await leases.take(r, keys.validator(bid(1)), "web-1", 10_000))
    assert await usage(r) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}
    assert await r.zscore(keys.pending_validation(keys.shard_of(bid(1))), bid(1)) is None


class CancelMidCall:
    """Stands in for a Script: the request is cancelled while the call is under way (the client left).

    ``run`` decides whether Redis had already run the call; ``late`` runs it afterwards instead, as
    a command already sent and executed after the handler gave up on it.
    """

    def __init__(self, script, *, run: bool, late: bool = False) -> None:
        self.script, self.run, self.late, self.pending = script, run, late, None

    async def __call__(self, r, **params):
        import asyncio

        if self.run:
            await self.script(r, **params)
        elif self.late:
            self.pending = (r, params)
        raise asyncio.CancelledError()


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
async def test_upload_cancelled_mid_call(api, monkeypatch, ran):
    import aiohttp

    stand_in = CancelMidCall(store._CREATE_FILE, run=ran, late=not ran)
    monkeypatch.setattr(store, "_CREATE_FILE", stand_in)
    with pytest.raises(aiohttp.ClientError):
        await api.upload(good_jsonl())
    monkeypatch.undo()
    r = api.client.app[appkeys.REDIS]
    if not ran:
        # The command reaches Redis only now: settled as never applied, it records nothing.
        with pytest.raises(RuntimeError):
            store._raise_for(store._text(await store._CREATE_FILE(stand_in.pending[0], **stand_in.pending[1])))
    listed = (await api.list_files()).ok()["data"]
    if ran:
        # It was recorded: the file exists, with its content, counted once.
        assert len(listed) == 1 and api.storage.stored_files() == [listed[0]["id"]]
        assert (await _usage_of(api))["stored_bytes"] == listed[0]["bytes"]
    else:
        assert listed == [] and api.storage.stored_files() == []
        assert (await _usage_of(api))["stored_bytes"] == 0
    assert await r.zcard(keys.owner_files(store.owner_of(TOKEN_A))) == len(listed)
