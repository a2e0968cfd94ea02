"""Heartbeats, the cluster metrics collector, /metrics auth and /readyz, on fakeredis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from pathlib import Path

import fakeredis
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.cli import status
from service.core import cluster, keys, store, streams
from service.core.config import Provider, Settings
from service.core.counters import Attempts
from service.core.heartbeat import Heartbeat
from service.core.storage import LocalStorage
from service.web import metrics
from service.web.app import READY_MARKER, create_app

PROVIDERS = (
    Provider(name="limited", base_url="http://127.0.0.1:9", models=("x-*",), max_concurrency=4),
    Provider(name="default", base_url="http://127.0.0.1:9", models=("*",)),
)


def _dead_redis() -> aioredis.Redis:
    """A client of a port where nothing listens, giving up at once."""
    return aioredis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def _settings(**kw) -> Settings:
    return Settings(api_tokens=("tok-a",), providers=PROVIDERS, **kw)


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {found} in {samples}"
    return found[0]


@pytest.fixture
def redis():
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def _running_batch(redis, batch_id: str) -> None:
    """The keys of a batch whose lines are being recorded (its results stream exists)."""
    await redis.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
    await redis.hset(keys.batch(batch_id), mapping={"completed": 0, "failed": 0, "total": 9})


async def test_recording_moves_exact_counters(redis):
    # Two batches in two shards: the counters are the sums over the shards.
    await _running_batch(redis, "batch_a")
    await _running_batch(redis, "batch_3")
    assert keys.shard_of("batch_a") != keys.shard_of("batch_3")
    retried = Attempts("default")
    retried.add("500", 0.03)
    retried.add("429", 0.2)
    retried.paused()
    retried.add("200", 0.7)
    fast = Attempts("default")
    fast.add("200", 0.03)
    results = [
        (0, "", "completed", b"{}", *retried.encode("completed")),
        (1, "", "completed", b"{}", *fast.encode("completed")),
        (2, "", "failed", b"{}", *fast.encode("failed")),
        (3, "", "failed", b"{}"),
    ]  # never sent: counts as a line only
    assert await store.record_results(redis, "batch_a", results[:2]) == 2
    assert await store.record_results(redis, "batch_3", results[2:]) == 2
    # Recorded again (a redelivery, or redis-py re-sending the script after a lost reply): no change.
    assert await store.record_results(redis, "batch_a", results[:2]) == 0
    await store.record_many(redis, {"batch_a": results[:2], "batch_3": results[2:]})

    beat_a = Heartbeat(redis, "w-a", "worker", fields=lambda: {"in_flight": 1, "concurrency": 8})
    beat_a.tally.started("default")
    beat_b = Heartbeat(redis, "w-b", "worker", fields=lambda: {"in_flight": 0, "concurrency": 8})
    web = Heartbeat(redis, "web-a", "web", fields=lambda: {"state": "serving", "in_flight": 3})
    assert await beat_a.beat() and await beat_b.beat() and await web.beat()
    for key in (keys.PROCESSES, keys.process("w-a")):
        assert await redis.ttl(key) > 0, f"{key} must expire unless heartbeats keep it"
    # The counters never expire (a shard's vanishing alone would look like a counter going backwards).
    for shard in (keys.shard_of("batch_a"), keys.shard_of("batch_3")):
        for key in (keys.metrics_lines(shard), keys.metrics_latency(shard)):
            assert await redis.ttl(key) == -1, key

    snap = await cluster.snapshot(redis, _settings())
    fams = _families(metrics.exposition(snap).decode())
    assert _value(fams["sluice_lines"], "sluice_lines_total", outcome="completed") == 2
    assert _value(fams["sluice_lines"], "sluice_lines_total", outcome="failed") == 2
    assert await redis.hmget(keys.batch("batch_a"), "completed", "failed") == [b"2", b"0"]
    assert await redis.hmget(keys.batch("batch_3"), "completed", "failed") == [b"0", b"2"]
    hist = fams["sluice_upstream_request_duration_seconds"]
    name = "sluice_upstream_request_duration_seconds"
    assert _value(hist, name + "_count", provider="default", status="200") == 3
    assert _value(hist, name + "_bucket", provider="default", status="200", le="0.05") == 2
    assert _value(hist, name + "_bucket", provider="default", status="200", le="1.0") == 3
    assert _value(hist, name + "_bucket", provider="default", status="200", le="+Inf") == 3
    assert _value(hist, name + "_sum", provider="default", status="200") == pytest.approx(0.76)
    assert _value(hist, name + "_count", provider="default", status="429") == 1
    assert _value(hist, name + "_count", provider="default", status="500") == 1
    assert (
        _value(fams["sluice_upstream_requests"], "sluice_upstream_requests_total", provider="default", status="429")
        == 1
    )
    assert _value(fams["sluice_upstream_rate_limited"], "sluice_upstream_rate_limited_total", provider="default") == 1
    assert _value(fams["sluice_upstream_retries"], "sluice_upstream_retries_total", provider="default") == 2
    assert _value(fams["sluice_upstream_retries"], "sluice_upstream_retries_total", provider="limited") == 0
    assert _value(fams["sluice_provider_pauses"], "sluice_provider_pauses_total", provider="default") == 1
    assert _value(fams["sluice_processes"], "sluice_processes", role="worker", state="live") == 2
    assert _value(fams["sluice_processes"], "sluice_processes", role="worker", state="stale") == 0
    assert _value(fams["sluice_processes"], "sluice_processes", role="web", state="live") == 1
    assert _value(fams["sluice_web_requests_in_flight"], "sluice_web_requests_in_flight", process="web-a") == 3
    assert _value(fams["sluice_worker_lines_in_flight"], "sluice_worker_lines_in_flight", process="w-a") == 1
    assert (
        _value(fams["sluice_upstream_requests_in_flight"], "sluice_upstream_requests_in_flight", provider="default")
        == 1
    )

    # A batch that ended (its work keys deleted) records nothing, and counts nothing.
    await redis.delete(*keys.work_keys("batch_a"))
    assert await store.record_results(redis, "batch_a", [(5, "", "completed", b"{}", *fast.encode("completed"))]) == 0
    assert (await cluster.snapshot(redis, _settings())).lines == {"completed": 2, "failed": 2}

    # A clean stop leaves the list; a process that stops beating turns stale.
    await beat_a.close()
    await redis.zadd(keys.PROCESSES, {"w-b": (await redis.time())[0] - 60})
    snap = await cluster.snapshot(redis, _settings())
    fams = _families(metrics.exposition(snap).decode())
    assert _value(fams["sluice_processes"], "sluice_processes", role="worker", state="live") == 0
    assert _value(fams["sluice_processes"], "sluice_processes", role="worker", state="stale") == 1
    assert _value(fams["sluice_process_up"], "sluice_process_up", process="w-b") == 0
    text = status.render(snap)
    assert "STALE" in text and "w-a" not in text and "web-a" in text


async def test_failed_beat_is_reported_not_raised():
    dead = _dead_redis()
    beat = Heartbeat(dead, "w", "worker")
    assert not await beat.beat()
    await dead.aclose()


async def test_batch_provider_and_finalizer_gauges(redis):
    now_ms = int((await redis.time())[0] * 1000)
    for batch_id, st, total, done, model in (
        ("batch_a", "in_progress", 10, 4, "gpt-4o"),
        ("batch_b", "in_progress", 5, 0, "x-small"),
    ):
        await redis.hset(
            keys.batch(batch_id),
            mapping={
                "owner": "o" * 32,
                "status": st,
                "total": total,
                "completed": done,
                "failed": 0,
                "model": model,
                "provider": "",
                "in_progress_at": now_ms // 1000 - 10,
            },
        )
        await redis.sadd(keys.live_batches(keys.shard_of(batch_id)), batch_id)
    await redis.xadd(keys.lines("batch_a"), {streams.LINE_CUSTOM_ID: "x"}, id="0-1")
    await redis.xgroup_create(keys.lines("batch_a"), keys.WORKER_GROUP, id="0")
    await redis.xreadgroup(keys.WORKER_GROUP, "w", {keys.lines("batch_a"): ">"})
    await redis.xadd(keys.results("batch_a"), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
    await redis.xadd(keys.results("batch_a"), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
    await redis.set(keys.provider_pause("default"), now_ms + 600_000)
    await redis.zadd(keys.provider_inflight("limited"), {"h1": now_ms + 60_000, "h2": now_ms + 60_000})

    snap = await cluster.snapshot(redis, _settings())
    fams = _families(metrics.exposition(snap).decode())
    assert _value(fams["sluice_batch_lines_waiting"], "sluice_batch_lines_waiting", batch_id="batch_a") == 6
    assert _value(fams["sluice_batch_lines_waiting"], "sluice_batch_lines_waiting", batch_id="batch_b") == 5
    assert _value(fams["sluice_provider_lines_waiting"], "sluice_provider_lines_waiting", provider="default") == 6
    assert _value(fams["sluice_provider_lines_waiting"], "sluice_provider_lines_waiting", provider="limited") == 5
    assert _value(fams["sluice_batch_lines_pending"], "sluice_batch_lines_pending", batch_id="batch_a") == 1
    assert _value(fams["sluice_batch_lines_pending"], "sluice_batch_lines_pending", batch_id="batch_b") == 0
    assert _value(fams["sluice_finalizer_lag_lines"], "sluice_finalizer_lag_lines") == 2
    assert _value(fams["sluice_finalizer_lag_seconds"], "sluice_finalizer_lag_seconds") >= 0
    # 600 s from when it was set, less however long this test took since (a minute at the very worst).
    assert (
        540
        < _value(fams["sluice_provider_paused_seconds"], "sluice_provider_paused_seconds", provider="default")
        <= 600
    )
    assert _value(fams["sluice_provider_leases"], "sluice_provider_leases", provider="limited") == 2
    assert _value(fams["sluice_batches"], "sluice_batches", status="in_progress") == 2
    text = status.render(snap)
    assert "batch_a" in text and "4/10" in text and "paused" in text


class FailingStorage(LocalStorage):
    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        raise PermissionError("read-only file system")


class CountingStorage(LocalStorage):
    """Local storage that counts the calls /readyz makes, and can be made to fail reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[str] = []
        self.down = False

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        self.calls.append(f"write {key}")
        return await super().write(key, chunks)

    async def delete(self, key: str) -> None:
        self.calls.append(f"delete {key}")
        await super().delete(key)

    async def size(self, key: str) -> int | None:
        self.calls.append(f"size {key}")
        if self.down:
            raise ConnectionError("storage is down")
        return await super().size(key)


async def _client(aiohttp_client, tmp_path: Path, *, redis=None, storage=None, **kw):
    r = redis if redis is not None else fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    app = create_app(_settings(**kw), redis=r, storage=storage or LocalStorage(tmp_path))
    return await aiohttp_client(app)


async def test_readyz(aiohttp_client, tmp_path):
    ok = await _client(aiohttp_client, tmp_path / "ok")
    res = await ok.get("/readyz")
    assert res.status == 200, await res.text()
    assert await res.json() == {"status": "ok"}
    assert [p.name for p in (tmp_path / "ok" / "files").iterdir()] == [READY_MARKER]

    broken = await _client(aiohttp_client, tmp_path / "broken", storage=FailingStorage(tmp_path / "broken"))
    res = await broken.get("/readyz")
    assert res.status == 503
    body = await res.json()
    assert body["redis"] == "ok" and "read-only" in body["storage"], body

    dead = _dead_redis()
    down = await _client(aiohttp_client, tmp_path / "down", redis=dead)
    res = await down.get("/readyz")
    assert res.status == 503
    assert json.loads(await res.text())["storage"] == "ok"
    await dead.aclose()


async def test_readyz_reads_storage_and_writes_once(aiohttp_client, tmp_path):
    storage = CountingStorage(tmp_path / "s")
    client = await _client(aiohttp_client, tmp_path / "s", storage=storage, readyz_storage_cache_s=0)
    for _ in range(5):
        assert (await client.get("/readyz")).status == 200
    # The marker is written by the first probe only; every probe reads its size, none deletes.
    assert storage.calls == [f"size {READY_MARKER}", f"write {READY_MARKER}"] + [f"size {READY_MARKER}"] * 4
    storage.down = True
    res = await client.get("/readyz")
    assert res.status == 503 and "storage is down" in (await res.json())["storage"]
    storage.down = False
    assert (await client.get("/readyz")).status == 200

    # With a cache, probes within it touch storage once; a failure is never cached.
    cached = CountingStorage(tmp_path / "c")
    client = await _client(aiohttp_client, tmp_path / "c", storage=cached, readyz_storage_cache_s=3600)
    for _ in range(5):
        assert (await client.get("/readyz")).status == 200
    assert cached.calls == [f"size {READY_MARKER}", f"write {READY_MARKER}"]


async def test_metrics_token(aiohttp_client, tmp_path):
    open_ = await _client(aiohttp_client, tmp_path / "open")
    res = await open_.get("/metrics")
    assert res.status == 200 and res.headers["Content-Type"].startswith("text/plain")
    assert "sluice_lines_total" in await res.text()

    guarded = await _client(aiohttp_client, tmp_path / "guarded", metrics_token="scrape-me")
    assert (await guarded.get("/metrics")).status == 401
    assert (await guarded.get("/metrics", headers={"Authorization": "Bearer tok-a"})).status == 401
    res = await guarded.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert res.status == 200


async def test_concurrency_limit_now_and_its_bound(redis):
    """Each provider's concurrency limit: its adaptive window (bounded by max_concurrency, else by the
    live workers' slots), in /metrics, `sluice status` and the dashboard's cluster JSON."""
    for name in ("w-a", "w-b"):
        assert await Heartbeat(redis, name, "worker", fields=lambda: {"in_flight": 0, "concurrency": 8}).beat()
    await redis.hset(keys.provider_window("default"), mapping={"w": "7.6", "ss": "7.6"})
    await redis.hset(keys.provider_window("limited"), mapping={"w": "9"})  # above its max_concurrency of 4
    snap = await cluster.snapshot(redis, _settings())
    fams = _families(metrics.exposition(snap).decode())
    name = "sluice_provider_concurrency_limit"
    assert _value(fams[name], name, provider="default") == 7
    assert _value(fams[name], name, provider="limited") == 4
    name = "sluice_provider_concurrency_max"
    assert _value(fams[name], name, provider="default") == 16  # 2 live workers x 8
    assert _value(fams[name], name, provider="limited") == 4
    name = "sluice_provider_concurrency_window"
    assert _value(fams[name], name, provider="default") == pytest.approx(7.6)
    text = status.render(snap)
    assert "7/16 (adaptive)" in text and "4/4 (adaptive)" in text

    # Adaptive concurrency off: the limit is max_concurrency, and a provider without one has none.
    fixed = (
        Provider(name="limited", base_url="http://127.0.0.1:9", max_concurrency=4, adaptive=False),
        Provider(name="default", base_url="http://127.0.0.1:9", adaptive=False),
    )
    snap = await cluster.snapshot(redis, Settings(api_tokens=("tok-a",), providers=fixed))
    fams = _families(metrics.exposition(snap).decode())
    assert (
        _value(fams["sluice_provider_concurrency_limit"], "sluice_provider_concurrency_limit", provider="limited") == 4
    )
    assert [s for s in fams.get("sluice_provider_concurrency_limit", []) if s.labels["provider"] == "default"] == []
    assert fams.get("sluice_provider_concurrency_window", []) == []
