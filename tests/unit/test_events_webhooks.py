"""GET /v1/batches/{id}/events (Server-Sent Events) and completion webhooks, on fakeredis.

No worker or finalizer runs here: the tests move a batch's counters and state themselves, as
the workers and the finalizer would, and run the webhook sender's passes by hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest
from aiohttp import web

from service.core import keys, shards, store
from service.core.config import (
    ConfigError,
    Settings,
    derive_webhook_secret,
    webhook_secret,
)
from service.core.webhooks import HEADER, WebhookSender, sign
from service.web import appkeys, events
from service.web.appkeys import REDIS

from .conftest import NO_AUTH, TOKEN_B, poll

UNKNOWN_BATCH = "batch_0000000fffff0123456789ab"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class SSE:
    """Reads events from an open text/event-stream response, in a task of its own."""

    def __init__(self, resp) -> None:
        self.resp = resp
        self.comments: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        name, data = "message", []
        try:
            while raw := await self.resp.content.readline():
                text = raw.decode().rstrip("\n")
                if text == "":
                    if data:
                        self.queue.put_nowait((name, json.loads("\n".join(data))))
                    name, data = "message", []
                    continue
                field, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "":
                    self.comments.append(value)
                elif field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout: float = 5.0) -> tuple[str, dict] | None:
        """The next event as (name, JSON data); None when the stream ended."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def close(self) -> None:
        self.task.cancel()


def redis_of(api):
    return api.client.app[REDIS]


async def _running_batch(api, **kwargs) -> dict:
    batch = await api.submit(**kwargs)
    running = await api.wait_batch(batch["id"])
    assert running["status"] == "in_progress", running
    return running


async def _finish(r, batch_id: str, status: str = "completed", allowed=("in_progress",)) -> None:
    applied, _ = await store.transition(
        r, batch_id, allowed=list(allowed), fields={"status": status, f"{status}_at": store.now()}, expire_s=3600
    )
    assert applied


# ----------------------------------------------------------------------------- SSE
async def test_events_stream_progress_then_done(api):
    batch = await _running_batch(api)
    r = redis_of(api)
    async with api.client.get(f"/v1/batches/{batch['id']}/events", headers={"Authorization": "Bearer tok-a"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        sse = SSE(resp)
        name, first = await sse.next()
        assert name == "batch" and first == await api.get_batch(batch["id"])
        assert first["request_counts"] == {"total": 2, "completed": 0, "failed": 0}

        await r.hincrby(keys.batch(batch["id"]), "completed", 1)
        name, second = await sse.next()
        assert name == "batch" and second["status"] == "in_progress"
        assert second["request_counts"] == {"total": 2, "completed": 1, "failed": 0}

        await r.hincrby(keys.batch(batch["id"]), "failed", 1)
        name, third = await sse.next()
        assert third["request_counts"] == {"total": 2, "completed": 1, "failed": 1}

        await _finish(r, batch["id"])
        name, last = await sse.next()
        assert name == "batch" and last["status"] == "completed" and last["completed_at"] is not None
        assert last == await api.get_batch(batch["id"])
        name, done = await sse.next()
        assert name == "done" and done == {"id": batch["id"], "status": "completed"}
        assert await sse.next() is None  # the server ended the stream


async def test_events_of_finished_batch_end_at_once(api):
    batch = await api.run_batch(b'{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n')
    assert batch["status"] == "failed"
    async with api.client.get(f"/batches/{batch['id']}/events", headers={"Authorization": "Bearer tok-a"}) as resp:
        assert resp.status == 200
        sse = SSE(resp)
        assert await sse.next() == ("batch", batch)
        assert (await sse.next())[0] == "done"
        assert await sse.next() is None


async def test_events_unknown_foreign_and_unauthenticated(api):
    batch = await _running_batch(api)
    (await api.request("GET", f"/v1/batches/{UNKNOWN_BATCH}/events")).error(404, param="batch_id")
    (await api.request("GET", "/v1/batches/not-an-id/events")).error(404, param="batch_id")
    (await api.request("GET", f"/v1/batches/{batch['id']}/events", token=TOKEN_B)).error(404, param="batch_id")
    (await api.request("GET", f"/batches/{batch['id']}/events", token=TOKEN_B)).error(404, param="batch_id")
    (await api.request("GET", f"/v1/batches/{batch['id']}/events", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("GET", f"/v1/batches/{batch['id']}/events", token="nope")).error(401, code="invalid_api_key")


async def test_events_keepalive_and_shutdown(api, monkeypatch):
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(events, "POLL_S", 0.02)
    batch = await _running_batch(api)
    async with api.client.get(f"/v1/batches/{batch['id']}/events", headers={"Authorization": "Bearer tok-a"}) as resp:
        sse = SSE(resp)
        assert (await sse.next())[0] == "batch"
        await poll(lambda: asyncio.sleep(0, "ping" in sse.comments), message="a keep-alive comment")
        assert _running(events.batch_events) == 1  # (what the disconnect test below waits to see end)
        # A stopping web process ends its streams at once.
        api.client.app[appkeys.EVENTS_STOP].set()
        assert await sse.next() is None


def _running(handler) -> int:
    """How many tasks are inside ``handler`` right now (walking each task's chain of awaits)."""
    found = 0
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None and frame.f_code is handler.__code__:
                found += 1
                break
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return found


async def test_events_client_disconnect_is_quiet(api, monkeypatch, caplog, capsys):
    monkeypatch.setattr(events, "POLL_S", 0.02)
    batch = await _running_batch(api)
    for _ in range(3):
        async with api.client.get(
            f"/v1/batches/{batch['id']}/events", headers={"Authorization": "Bearer tok-a"}
        ) as resp:
            assert (await SSE(resp).next())[0] == "batch"
    await redis_of(api).hincrby(keys.batch(batch["id"]), "completed", 1)
    # The handlers notice the closed connections on their next poll, and end.
    await poll(
        lambda: asyncio.sleep(0, not _running(events.batch_events)),
        timeout=30,
        message="the event handlers of the closed connections to end",
    )
    assert (await api.get_batch(batch["id"]))["request_counts"]["completed"] == 1
    assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")], caplog.text
    out = capsys.readouterr()
    for needle in ("Traceback", "unhandled_error", "[error", "exception"):
        assert needle not in out.out + out.err, out


# ----------------------------------------------------------------------------- webhook header
@pytest.mark.parametrize(
    "value",
    [
        "ftp://example.com/hook",
        "example.com/hook",
        "/relative",
        "https://",
        "http://exa mple.com/",
        "https://example.com/" + "a" * 2100,
        "javascript:alert(1)",
        "https://example.com/#frag",
    ],
)
async def test_webhook_header_rejected(make_api, value):
    api = await make_api(webhook_secret=SECRET)
    f = await api.upload_ok()
    res = await api.request(
        "POST",
        "/v1/batches",
        headers={HEADER: value},
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    res.error(400, param=HEADER, code="invalid_value")
    assert (await api.request("GET", "/v1/batches")).ok()["data"] == []


async def test_webhook_header_needs_a_secret(api):
    f = await api.upload_ok()
    res = await api.request(
        "POST",
        "/v1/batches",
        headers={HEADER: "https://example.com/hook"},
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    res.error(400, param=HEADER, code="webhooks_unavailable")


async def test_webhook_url_stored_and_queued_once_at_the_end(make_api):
    api = await make_api(webhook_secret=SECRET)
    f = await api.upload_ok()
    created = (
        await api.request(
            "POST",
            "/v1/batches",
            headers={HEADER: " https://example.com/hook?x=1 "},
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
    ).ok()
    assert "webhook" not in json.dumps(created)
    r = redis_of(api)
    assert await r.hget(keys.batch(created["id"]), "webhook_url") == b"https://example.com/hook?x=1"
    await api.wait_batch(created["id"])
    assert await shards.count(r, keys.webhooks_due, zset=True) == 0  # not before the end
    await _finish(r, created["id"])
    assert await r.zrange(keys.webhooks_due(keys.shard_of(created["id"])), 0, -1) == [created["id"].encode()]
    # Repeating the transition (a retried script) queues nothing more.
    assert (
        await store.transition(r, created["id"], allowed=["in_progress"], fields={"status": "completed"}, expire_s=3600)
    )[0]
    assert await shards.count(r, keys.webhooks_due, zset=True) == 1


async def test_batch_without_webhook_is_not_queued(api):
    batch = await _running_batch(api)
    await _finish(redis_of(api), batch["id"])
    assert await shards.count(redis_of(api), keys.webhooks_due, zset=True) == 0


# ----------------------------------------------------------------------------- delivery
async def test_webhook_delivery_retries_then_succeeds(make_api, aiohttp_server):
    got: list[tuple[dict, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(got) <= 2 else 204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app)
    # The receiver listens on loopback, which only SLUICE_WEBHOOK_ALLOW_PRIVATE lets webhooks reach.
    api = await make_api(
        webhook_secret=SECRET, webhook_backoff_s=0.05, webhook_max_attempts=4, webhook_allow_private=True
    )
    url = str(server.make_url("/hook"))
    f = await api.upload_ok()
    created = (
        await api.request(
            "POST",
            "/v1/batches",
            headers={HEADER: url},
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
    ).ok()
    await api.wait_batch(created["id"])
    r = redis_of(api)
    await _finish(r, created["id"], "cancelled", allowed=["in_progress"])
    sender = WebhookSender(r, api.settings)
    try:

        async def delivered():
            await sender.run_pass()
            return len(got) >= 3 and await shards.count(r, keys.webhooks_due, zset=True) == 0

        await poll(delivered, timeout=30, interval=0.02, message="the third attempt to be accepted")
        assert await sender.run_pass() == 0
    finally:
        await sender.aclose()
    assert len(got) == 3
    ids = {h["webhook-id"] for h, _ in got}
    assert ids == {f"msg_{created['id']}"}  # the same id on every retry
    headers, body = got[-1]
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    event = json.loads(body)
    assert event["type"] == "batch.cancelled" and event["object"] == "event"
    assert event["data"] == await api.get_batch(created["id"])
    h = await r.hgetall(keys.batch(created["id"]))
    assert h[b"webhook_state"] == b"delivered" and h[b"webhook_attempts"] == b"3"


async def test_webhook_given_up_after_max_attempts(make_api):
    api = await make_api(
        webhook_secret=SECRET,
        webhook_backoff_s=0.01,
        webhook_max_attempts=2,
        webhook_timeout_s=1.0,
        webhook_allow_private=True,
    )
    f = await api.upload_ok()
    created = (
        await api.request(
            "POST",
            "/v1/batches",
            headers={HEADER: "http://127.0.0.1:9/hook"},
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
    ).ok()
    await api.wait_batch(created["id"])
    r = redis_of(api)
    await _finish(r, created["id"])
    sender = WebhookSender(r, api.settings)
    try:

        async def gone():
            await sender.run_pass()
            return await shards.count(r, keys.webhooks_due, zset=True) == 0

        await poll(gone, timeout=30, interval=0.02, message="the webhook to be given up")
    finally:
        await sender.aclose()
    h = await r.hgetall(keys.batch(created["id"]))
    assert h[b"webhook_state"] == b"failed" and h[b"webhook_attempts"] == b"2"


def test_sign_matches_standard_webhooks_example():
    # The example of the Standard Webhooks specification (and its reference libraries).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_webhook_secret_settings():
    assert webhook_secret({}) == ""
    assert webhook_secret({"SLUICE_WEBHOOK_SECRET": "plain-secret"}) == "plain-secret"
    assert webhook_secret({"SLUICE_SECRET_KEY": "k"}) == derive_webhook_secret("k")
    assert derive_webhook_secret("k").startswith("whsec_") and derive_webhook_secret("k") != derive_webhook_secret("j")
    with pytest.raises(ConfigError):
        webhook_secret({"SLUICE_WEBHOOK_SECRET": "whsec_not base64!"})
    s = Settings.from_env(
        {"SLUICE_WEBHOOK_SECRET": SECRET, "SLUICE_WEBHOOK_BACKOFF_S": "0.5", "SLUICE_WEBHOOK_MAX_ATTEMPTS": "3"}
    )
    assert (s.webhook_secret, s.webhook_backoff_s, s.webhook_max_attempts) == (SECRET, 0.5, 3)
    assert SECRET not in repr(s)


async def test_webhook_of_a_vanished_batch_is_dropped(make_api):
    api = await make_api(webhook_secret=SECRET)
    r = redis_of(api)
    await r.zadd(keys.webhooks_due(keys.shard_of(UNKNOWN_BATCH)), {UNKNOWN_BATCH: 0})
    sender = WebhookSender(r, api.settings)
    try:
        assert await sender.run_pass() == 1
    finally:
        await sender.aclose()
    assert await shards.count(r, keys.webhooks_due, zset=True) == 0
    assert await r.exists(keys.batch(UNKNOWN_BATCH)) == 0  # no stub record left behind
