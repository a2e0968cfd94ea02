"""The mock provider's own Files and Batches API (service.devtools.mock_provider), driven over HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from service.devtools.mock_provider import create_app
from tests.support.waiting import async_wait_until

CHAT = "/v1/chat/completions"


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _row(custom_id: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra},
    }


async def _upload(client: Any, data: bytes, name: str = "in.jsonl") -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename=name, content_type="application/jsonl")
    resp = await client.post("/v1/files", data=form)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _create(client: Any, file_id: str, **metadata: str) -> dict[str, Any]:
    resp = await client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": metadata or None},
    )
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _wait(client: Any, batch_id: str, statuses: set[str], timeout: float = 10.0) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            batch = await (await client.get(f"/v1/batches/{batch_id}")).json()
            if batch["status"] in statuses:
                return batch
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(poll(), timeout)


async def _lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    resp = await client.get(f"/v1/files/{file_id}/content")
    assert resp.status == 200
    return [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]


async def test_a_batch_runs_to_completion_with_output_and_error_files(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    rows = [_row(f"r{i}", f"hello {i}") for i in range(5)] + [_row("bad", mock_status=404)]
    f = await _upload(client, _jsonl(rows), "part.jsonl")
    assert (f["object"], f["purpose"], f["filename"], f["bytes"]) == ("file", "batch", "part.jsonl", len(_jsonl(rows)))
    created = await _create(client, f["id"], sluice_batch_id="batch_x", sluice_part="0")
    assert created["status"] in ("validating", "in_progress") and created["metadata"]["sluice_part"] == "0"

    batch = await _wait(client, created["id"], {"completed"})
    assert batch["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert batch["completed_at"] and batch["finalizing_at"]
    out, err = await _lines(client, batch["output_file_id"]), await _lines(client, batch["error_file_id"])
    assert sorted(line["custom_id"] for line in out) == [f"r{i}" for i in range(5)]
    for line in out:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: hello {line['custom_id'][1:]}"
        assert line["response"]["body"]["usage"]["total_tokens"] > 0
    assert [(e["custom_id"], e["response"]["status_code"]) for e in err] == [("bad", 404)]

    listed = await (await client.get("/v1/batches", params={"limit": "1"})).json()
    assert listed["data"][0]["id"] == created["id"] and listed["has_more"] is False
    files = await (await client.get("/v1/files", params={"purpose": "batch"})).json()
    assert [x["id"] for x in files["data"]] == [f["id"]]
    deleted = await (await client.delete(f"/v1/files/{f['id']}")).json()
    assert deleted == {"id": f["id"], "object": "file", "deleted": True}
    assert (await client.get(f"/v1/files/{f['id']}")).status == 404
    stats = await (await client.get("/_mock/stats")).json()
    assert stats["requests"] == 0, "no real-time request was made"
    assert stats["batch_requests"] >= 6


async def test_cancel_keeps_partial_results_and_a_finished_batch_answers_409(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(batch_cancel_ms=50))
    f = await _upload(client, _jsonl([_row(f"r{i}", mock_latency_ms=100) for i in range(50)]))
    created = await _create(client, f["id"])
    await asyncio.wait_for(_until_done(client, created["id"], 2), 10)
    cancelling = await (await client.post(f"/v1/batches/{created['id']}/cancel")).json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    batch = await _wait(client, created["id"], {"cancelled"})
    out = await _lines(client, batch["output_file_id"])
    assert 2 <= len(out) < 50 and batch["error_file_id"] is None, "unrun lines get no line"
    assert batch["request_counts"]["completed"] == len(out)
    again = await client.post(f"/v1/batches/{created['id']}/cancel")
    assert again.status == 409 and again.headers["x-should-retry"] == "false"


async def _until_done(client: Any, batch_id: str, n: int) -> None:
    async def completed() -> bool:
        return (await (await client.get(f"/v1/batches/{batch_id}")).json())["request_counts"]["completed"] >= n

    await async_wait_until(completed, timeout=30, interval=0.01, message=f"{n} lines of {batch_id} to complete")


@pytest.mark.parametrize(
    "marker, status", [({"mock_batch_expire": True}, "expired"), ({"mock_batch_fail": "quota exceeded"}, "failed")]
)
async def test_markers_make_a_batch_expire_or_fail(aiohttp_client: Any, marker: dict, status: str) -> None:
    client = await aiohttp_client(create_app())
    rows = [_row("a"), _row("b"), _row("c", **marker), _row("d")]
    batch = await _wait(client, (await _create(client, (await _upload(client, _jsonl(rows)))["id"]))["id"], {status})
    out, err = await _lines(client, batch["output_file_id"]), await _lines(client, batch["error_file_id"])
    if status == "expired":
        assert [line["custom_id"] for line in out] == ["a", "b"]
        assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("c", "batch_expired"), ("d", "batch_expired")]
        assert batch["expired_at"]
    else:
        assert out == err == []
        assert batch["errors"]["data"][0]["message"] == "quota exceeded" and batch["failed_at"]


async def test_a_window_expires_a_slow_batch(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(batch_window_ms=150, batch_line_ms=60))
    f = await _upload(client, _jsonl([_row(f"r{i}") for i in range(20)]))
    batch = await _wait(client, (await _create(client, f["id"]))["id"], {"expired"})
    out, err = await _lines(client, batch["output_file_id"]), await _lines(client, batch["error_file_id"])
    assert len(out) + len(err) == 20 and 0 < len(err) < 20


async def test_batch_list_pages_newest_first(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    f = await _upload(client, _jsonl([_row("x")]))
    ids = [(await _create(client, f["id"], n=str(i)))["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = await (
            await client.get("/v1/batches", params={"limit": "2", **({"after": after} if after else {})})
        ).json()
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]


async def test_bad_requests_get_openai_errors(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    resp = await client.post(
        "/v1/batches", json={"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}
    )
    assert resp.status == 400 and set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    assert (await client.get("/v1/batches/batch_nope")).status == 404
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"not json\n", filename="x.jsonl")
    assert (await client.post("/v1/files", data=form)).status == 400
