"""A batch's full life through the official SDK: upload, create, run against the mock, results."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _check_result_line(line: dict) -> None:
    assert set(line) >= {"id", "custom_id", "response", "error"}, line
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_"), line
    assert isinstance(line["custom_id"], str), line


def _check_timestamps(batch) -> None:
    assert batch.in_progress_at is not None, batch
    assert batch.finalizing_at is not None, batch
    assert batch.completed_at is not None, batch
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at, batch
    assert batch.expires_at == batch.created_at + 86400, batch
    for unset in ("failed_at", "cancelled_at", "cancelling_at", "expired_at"):
        assert getattr(batch, unset) is None, (unset, batch)


def test_mixed_batch_end_to_end(stack):
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    statuses = {}
    messages = {}
    rows = []
    for i in range(60):
        cid = f"req-{run}-{i:03d}"
        messages[cid] = f"hello {i} from {run}"
        extra = {}
        if i % 10 == 3:
            extra["mock_status"] = 400
        elif i % 10 == 7:
            extra["mock_status"] = 404
        statuses[cid] = extra.get("mock_status", 200)
        rows.append(stack.chat_line(cid, messages[cid], **extra))

    data = stack.to_jsonl(rows)
    input_file = stack.upload_jsonl(data, client=client, filename="e2e.jsonl")
    assert input_file.object == "file"
    assert input_file.purpose == "batch"
    assert input_file.bytes == len(data)
    assert input_file.filename == "e2e.jsonl"
    assert input_file.status == "processed"
    assert client.files.retrieve(input_file.id).id == input_file.id
    assert client.files.content(input_file.id).content == data

    created = stack.create_batch(input_file.id, client=client, metadata={"suite": "e2e", "run": run})
    assert created.id.startswith("batch_")
    assert created.object == "batch"
    assert created.status == "validating"
    assert created.endpoint == "/v1/chat/completions"
    assert created.input_file_id == input_file.id
    assert created.completion_window == "24h"
    assert created.metadata == {"suite": "e2e", "run": run}
    assert created.expires_at == created.created_at + 86400
    assert created.output_file_id is None and created.error_file_id is None

    batch = stack.wait_for_batch(created.id, client=client)
    assert batch.status == "completed", batch
    assert batch.errors is None or not batch.errors.data, batch.errors
    _check_timestamps(batch)
    assert batch.created_at == created.created_at
    assert batch.metadata == {"suite": "e2e", "run": run}

    n_ok = sum(1 for s in statuses.values() if s == 200)
    assert batch.request_counts.total == 60
    assert batch.request_counts.completed == n_ok == 48
    assert batch.request_counts.failed == 12
    assert batch.output_file_id and batch.error_file_id

    for file_id in (batch.output_file_id, batch.error_file_id):
        f = client.files.retrieve(file_id)
        assert f.id == file_id
        assert f.purpose == "batch_output"
        content = client.files.content(file_id)
        assert f.bytes == len(content.content), (f.bytes, len(content.content))

    output, errors = stack.results(batch, client=client)
    assert len(output) == batch.request_counts.completed
    assert len(errors) == batch.request_counts.failed
    assert len(output) + len(errors) == batch.request_counts.total

    seen = Counter(line["custom_id"] for line in output + errors)
    assert set(seen) == set(statuses), set(seen) ^ set(statuses)
    assert all(n == 1 for n in seen.values()), [cid for cid, n in seen.items() if n != 1]
    assert len({line["id"] for line in output + errors}) == 60, "result line ids are not unique"

    for line in output:
        _check_result_line(line)
        cid = line["custom_id"]
        assert statuses[cid] == 200, line
        assert line["error"] is None, line
        resp = line["response"]
        assert resp["status_code"] == 200, line
        assert isinstance(resp["request_id"], str), line
        assert resp["body"]["choices"][0]["message"]["content"] == "echo: " + messages[cid], line

    for line in errors:
        _check_result_line(line)
        cid = line["custom_id"]
        assert statuses[cid] in (400, 404), line
        assert line["error"] is None, line
        resp = line["response"]
        assert resp is not None, line
        assert resp["status_code"] == statuses[cid], line
        assert isinstance(resp["body"], dict) and "error" in resp["body"], line


def test_all_success_batch_has_no_error_file(stack):
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"ok-{run}-{i}", f"fine {i}") for i in range(12)]
    _, created = stack.submit(rows, client=client)

    batch = stack.wait_for_batch(created.id, client=client)
    assert batch.status == "completed", batch
    _check_timestamps(batch)
    assert batch.error_file_id is None
    assert batch.output_file_id is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)

    output = stack.read_file(batch.output_file_id, client=client)
    assert sorted(line["custom_id"] for line in output) == sorted(r["custom_id"] for r in rows)
    by_id = {r["custom_id"]: r for r in rows}
    for line in output:
        _check_result_line(line)
        expected = "echo: " + by_id[line["custom_id"]]["body"]["messages"][0]["content"]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected


def test_all_failing_batch_has_no_output_file(stack):
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"bad-{run}-{i}", f"nope {i}", mock_status=404) for i in range(5)]
    _, created = stack.submit(rows, client=client)

    batch = stack.wait_for_batch(created.id, client=client)
    assert batch.status == "completed", batch
    assert batch.output_file_id is None
    assert batch.error_file_id is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 0, 5)
    errors = stack.read_file(batch.error_file_id, client=client)
    assert sorted(line["custom_id"] for line in errors) == sorted(r["custom_id"] for r in rows)
    assert all(line["response"]["status_code"] == 404 and line["error"] is None for line in errors), errors


async def test_concurrent_batches_through_the_async_sdk(stack, async_wait_until):
    import asyncio

    import openai

    client = openai.AsyncOpenAI(
        base_url=stack.api_url, api_key=stack.token, _strict_response_validation=True, max_retries=0, timeout=30
    )
    run = uuid.uuid4().hex[:8]
    try:

        async def one(k: int):
            rows = [stack.chat_line(f"async-{run}-{k}-{i}", f"async {k}/{i}") for i in range(5)]
            f = await client.files.create(file=(f"async{k}.jsonl", stack.to_jsonl(rows)), purpose="batch")
            return await client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": str(k)}
            )

        created = await asyncio.gather(*(one(k) for k in range(8)))
        assert len({b.id for b in created}) == 8

        async def all_done():
            batches = await asyncio.gather(*(client.batches.retrieve(b.id) for b in created))
            finished = all(b.status in ("completed", "failed", "cancelled", "expired") for b in batches)
            return batches if finished else None

        finished = await async_wait_until(all_done, timeout=60, interval=0.1, check=stack.check_alive)
        for k, batch in enumerate(finished):
            assert batch.status == "completed", batch
            assert batch.metadata == {"k": str(k)}
            assert batch.request_counts.completed == 5
            text = (await client.files.content(batch.output_file_id)).text
            got = {line["custom_id"]: line for line in stack.parse_jsonl(text)}
            assert sorted(got) == sorted(f"async-{run}-{k}-{i}" for i in range(5))
            for cid, line in got.items():
                i = cid.rsplit("-", 1)[1]
                assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: async {k}/{i}"
    finally:
        await client.close()
