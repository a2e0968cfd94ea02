"""Live progress over Server-Sent Events, and signed completion webhooks, on a real stack.

The webhook receiver is a small aiohttp server on a loopback port, run in a thread of its own
(the tests themselves are synchronous, like the SDK they drive). Where a batch must be seen part-way
or still running, its lines wait at the mock's gate until the test releases them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.core import keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "whsec_" + base64.b64encode(b"integration-webhook-secret-32byt").decode()
HEADER = "x-sluice-webhook-url"
SSE_STOP_GRACE_S = 120


class Receiver:
    """Records every POST; a path answers 500 to its first ``fail_first[path]`` deliveries."""

    def __init__(self, port: int, fail_first: dict[str, int]) -> None:
        self.port = port
        self.fail_first = fail_first
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def deliveries(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [d for d in self.got if d["path"] == path]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            n = sum(1 for d in self.got if d["path"] == request.path) + 1
            status = 500 if n <= self.fail_first.get(request.path, 0) else 200
            self.got.append(
                {
                    "path": request.path,
                    "headers": dict(request.headers),
                    "body": body,
                    "status": status,
                    "at": time.monotonic(),
                }
            )
        return web.Response(status=status, text="no" if status == 500 else "ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def wstack(module_stack_factory):
    return module_stack_factory.start(
        name="events",
        workers=1,
        worker_concurrency=2,
        mock={"gates": True},
        # The receiver listens on loopback, which only SLUICE_WEBHOOK_ALLOW_PRIVATE lets webhooks reach.
        env={
            "SLUICE_WEBHOOK_SECRET": SECRET,
            "SLUICE_WEBHOOK_BACKOFF_S": "0.3",
            "SLUICE_WEBHOOK_MAX_ATTEMPTS": "6",
            "SLUICE_WEBHOOK_ALLOW_PRIVATE": "1",
        },
    )


@pytest.fixture
def receiver(free_port):
    rec = Receiver(free_port(), {"/fails-twice": 2})
    rec.start()
    yield rec
    rec.stop()


def _verify(delivery: dict[str, Any]) -> dict:
    """Check a delivery's Standard Webhooks signature as a receiver would; return the event."""
    h = delivery["headers"]
    msg_id, timestamp, signature = h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]
    assert abs(int(timestamp) - time.time()) < 300, timestamp
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{timestamp}.".encode() + delivery["body"], hashlib.sha256).digest()
    ).decode()
    assert any(hmac.compare_digest(f"v1,{expected}", s) for s in signature.split(" ")), (signature, expected)
    assert h["Content-Type"] == "application/json"
    return json.loads(delivery["body"])


async def _read_events(
    url: str, token: str, timeout: float = 120, events: list[tuple[str, dict]] | None = None
) -> list[tuple[str, dict]]:
    """Every event of an SSE stream until the server ends it (appended to ``events`` as they come)."""
    events = [] if events is None else events
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache"
            name, data = "message", []
            async for raw in resp.content:
                text = raw.decode().rstrip("\n")
                if not text:
                    if data:
                        events.append((name, json.loads("\n".join(data))))
                    name, data = "message", []
                elif text.startswith("event:"):
                    name = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].strip())
    return events


def test_sse_follows_a_batch_to_completion(wstack):
    client = wstack.client()
    run = uuid.uuid4().hex[:8]
    gate = f"sse-{run}"
    # The second half waits at the gate: the batch stays part-done until the stream has shown it so.
    rows = [
        wstack.chat_line(f"sse-{run}-{i}", f"hello {i}", **({"mock_hold": gate} if i >= 8 else {})) for i in range(16)
    ]
    _, created = wstack.submit(rows, client=client)

    async def follow() -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        reader = asyncio.create_task(
            _read_events(f"{wstack.api_url}/batches/{created.id}/events", wstack.token, events=events)
        )
        deadline = time.monotonic() + 120  # a failure deadline: the part-done state comes in a second or two
        while not any(name == "batch" and data["request_counts"]["completed"] == 8 for name, data in events):
            assert not reader.done() and time.monotonic() < deadline, f"no part-done event: {events}"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(wstack.mock().release, gate)
        await reader
        return events

    events = asyncio.run(follow())

    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1, names
    assert set(names[:-1]) == {"batch"}, names
    batches = [data for name, data in events if name == "batch"]
    assert len(batches) >= 3, batches  # the first state, progress on the way, and the end
    assert batches[-1]["status"] == "completed", batches[-1]
    assert events[-1][1] == {"id": created.id, "status": "completed"}
    done_counts = [b["request_counts"]["completed"] + b["request_counts"]["failed"] for b in batches]
    assert done_counts == sorted(done_counts), done_counts  # never goes back
    assert done_counts[-1] == 16 and batches[-1]["request_counts"]["total"] == 16
    assert any(0 < n < 16 for n in done_counts), f"no progress event on the way: {done_counts}"
    statuses = [b["status"] for b in batches]
    assert statuses.index("in_progress") < statuses.index("completed"), statuses
    # The last event is the very object GET /v1/batches/{id} returns.
    assert batches[-1] == wstack.http("GET", f"/v1/batches/{created.id}").json()


def test_sse_unknown_batch_is_404(wstack):
    res = wstack.http("GET", "/v1/batches/batch_0000000fffff0123456789ab/events")
    wstack.assert_error(res, 404)
    res = wstack.http("GET", "/batches/batch_0000000fffff0123456789ab/events", token=None)
    wstack.assert_error(res, 401)


@pytest.mark.single_redis
def test_webhook_retried_until_accepted(wstack, receiver, wait_until):
    client = wstack.client()
    run = uuid.uuid4().hex[:8]
    rows = [wstack.chat_line(f"wh-{run}-{i}", f"hook {i}") for i in range(3)]
    f = wstack.upload_jsonl(rows, client=client)
    created = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={HEADER: receiver.url("/fails-twice")},
    )
    batch = wstack.wait_for_batch(created.id, client=client)
    assert batch.status == "completed", batch

    accepted = wait_until(
        lambda: [d for d in receiver.deliveries("/fails-twice") if d["status"] == 200],
        timeout=30,
        message="an accepted webhook delivery",
        check=wstack.check_alive,
    )
    tries = receiver.deliveries("/fails-twice")
    assert [d["status"] for d in tries] == [500, 500, 200], [d["status"] for d in tries]
    assert tries[1]["at"] - tries[0]["at"] >= 0.25 and tries[2]["at"] - tries[1]["at"] >= 0.5  # backoff doubles
    assert len({d["headers"]["webhook-id"] for d in tries}) == 1  # one message, retried
    event = _verify(accepted[0])
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == created.id and event["data"]["status"] == "completed"
    assert event["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert event["data"] == wstack.http("GET", f"/v1/batches/{created.id}").json()
    # Nothing more is sent once it was accepted.
    due = wstack.redis.client()
    try:
        wait_until(
            lambda: due.zscore(keys.webhooks_due(keys.shard_of(created.id)), created.id) is None,
            timeout=10,
            message="the delivery to leave the queue",
        )
    finally:
        due.close()
    assert len(receiver.deliveries("/fails-twice")) == 3
    assert wstack.logs_containing("webhook_delivered") == ["finalizer"]
    assert not wstack.logs_containing(SECRET)


def test_cancelled_batch_gets_batch_cancelled(wstack, receiver, wait_until):
    client = wstack.client()
    run = uuid.uuid4().hex[:8]
    gate = f"whc-{run}"
    rows = [wstack.chat_line(f"whc-{run}-{i}", f"held {i}", mock_hold=gate) for i in range(20)]
    f = wstack.upload_jsonl(rows, client=client)
    created = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={HEADER: receiver.url("/cancelled")},
    )
    wstack.wait_for_batch(created.id, client=client, statuses=("in_progress",), interval=0.02)
    client.batches.cancel(created.id)
    wstack.mock().release(gate)  # only now may the lines in flight finish
    batch = wstack.wait_for_batch(created.id, client=client)
    assert batch.status == "cancelled", batch

    got = wait_until(
        lambda: receiver.deliveries("/cancelled"), timeout=30, message="the cancelled webhook", check=wstack.check_alive
    )
    assert len(got) == 1 and got[0]["status"] == 200
    event = _verify(got[0])
    assert event["type"] == "batch.cancelled" and event["data"]["id"] == created.id
    assert event["data"]["status"] == "cancelled" and event["data"]["cancelled_at"] is not None


def test_failed_batch_gets_batch_failed(wstack, receiver, wait_until):
    client = wstack.client()
    good = wstack.chat_line(f"whf-{uuid.uuid4().hex[:8]}", "ok")
    f = wstack.upload_jsonl([good, json.dumps({**good, "custom_id": "other", "method": "GET"})], client=client)
    created = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={HEADER: receiver.url("/failed")},
    )
    got = wait_until(
        lambda: receiver.deliveries("/failed"), timeout=30, message="the failed webhook", check=wstack.check_alive
    )
    event = _verify(got[0])
    assert event["type"] == "batch.failed" and event["data"]["status"] == "failed"
    assert event["data"]["id"] == created.id
    assert event["data"]["errors"]["data"][0]["code"] == "invalid_method"


def test_webhook_header_validated(wstack):
    f = wstack.upload_jsonl([wstack.chat_line(f"whv-{uuid.uuid4().hex[:8]}", "x")])
    res = wstack.http(
        "POST",
        "/v1/batches",
        headers={HEADER: "ftp://example.com/"},
        json_body={"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    wstack.assert_error(res, 400, param=HEADER, code="invalid_value")


def test_open_stream_does_not_hold_web_shutdown(stack_factory):
    """A stopping web process ends its event streams at once instead of waiting out the grace."""
    # A long grace, so "at once" and "waited it out" are far apart whatever the machine's speed.
    st = stack_factory.start(
        name="sse-stop", workers=0, finalizer=False, env={"SLUICE_SHUTDOWN_GRACE_S": str(SSE_STOP_GRACE_S)}
    )
    _, created = st.submit([st.chat_line(f"stop-{uuid.uuid4().hex[:8]}", "never answered")])
    st.wait_for_batch(created.id, statuses=("in_progress",), interval=0.02)
    web_proc = st.process("web")

    async def scenario() -> tuple[list[str], float]:
        names: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2 * SSE_STOP_GRACE_S)) as session:
            async with session.get(
                f"{st.api_url}/batches/{created.id}/events", headers={"Authorization": f"Bearer {st.token}"}
            ) as resp:
                first = await resp.content.readline()
                while first.strip() != b"event: batch":
                    first = await resp.content.readline()
                names.append("batch")
                started = time.monotonic()
                stopping = asyncio.get_running_loop().run_in_executor(
                    None, lambda: st.runner.stop([web_proc], grace=SSE_STOP_GRACE_S + 30)
                )
                async for raw in resp.content:
                    if raw.startswith(b"event:"):
                        names.append(raw.decode()[6:].strip())
                await stopping
                return names, time.monotonic() - started

    names, took = asyncio.run(scenario())
    assert names == ["batch"], names  # no terminal state: the stream simply ended
    assert not web_proc.alive and web_proc.returncode == 0, web_proc.describe()
    assert took < SSE_STOP_GRACE_S / 2, f"the web process took {took:.1f}s to stop with an event stream open"
    assert "web_requests_cut" not in web_proc.log_path.read_text()
