"""The Files and Batches APIs are also served without the ``/v1`` prefix."""

from __future__ import annotations

import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_sdk_flow_on_bare_paths(stack):
    client = stack.client(bare=True)
    assert str(client.base_url).rstrip("/") == stack.base_url
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"bare-{run}-{i}", f"bare {i}") for i in range(5)]
    data = stack.to_jsonl(rows)

    f = client.files.create(file=("bare.jsonl", data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data)
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == data
    assert f.id in {x.id for x in client.files.list(purpose="batch")}

    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert created.status == "validating"
    assert client.batches.retrieve(created.id).id == created.id
    assert created.id in {b.id for b in client.batches.list(limit=100)}

    batch = stack.wait_for_batch(created.id, client=client)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 5
    output = stack.parse_jsonl(client.files.content(batch.output_file_id).text)
    by_id = {r["custom_id"]: r["body"]["messages"][0]["content"] for r in rows}
    assert sorted(line["custom_id"] for line in output) == sorted(by_id)
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + by_id[line["custom_id"]]

    # The same objects through /v1 and through the bare paths.
    v1 = stack.client()
    assert v1.batches.retrieve(batch.id).model_dump() == client.batches.retrieve(batch.id).model_dump()
    assert v1.files.retrieve(f.id).model_dump() == client.files.retrieve(f.id).model_dump()

    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    deleted = client.files.delete(f.id)
    assert deleted.id == f.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        v1.files.retrieve(f.id)


def test_raw_http_on_bare_paths(stack):
    run = uuid.uuid4().hex[:8]
    f = stack.upload_jsonl([stack.chat_line(f"raw-{run}", "raw")])
    res = stack.http("GET", f"/files/{f.id}")
    assert res.status == 200 and "json" in res.content_type
    assert res.json()["id"] == f.id

    body = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    res = stack.http("POST", "/batches", json_body=body)
    assert res.status == 200, res.body[:500]
    batch_id = res.json()["id"]
    stack.wait_for_batch(batch_id)

    res = stack.http("GET", f"/batches/{batch_id}")
    assert res.status == 200 and res.json()["status"] == "completed"
    res = stack.http("GET", "/batches?limit=1")
    assert res.status == 200 and res.json()["object"] == "list"
    res = stack.http("GET", f"/files/{f.id}/content")
    assert res.status == 200 and stack.parse_jsonl(res.body.decode())[0]["custom_id"] == f"raw-{run}"
    assert stack.http("GET", "/batches/batch_nope").status == 404
    stack.assert_error(stack.http("GET", "/files/file-nope"), 404)
