"""Files API details: upload fields, expiry options, raw content, delete."""

from __future__ import annotations

import uuid
import warnings

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

THIRTY_DAYS = 30 * 86400


def test_upload_fields_and_raw_content(stack):
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    data = stack.to_jsonl([stack.chat_line(f"f-{run}-{i}", "é ü ✓ " * i) for i in range(3)])
    f = client.files.create(file=(f"upload-{run}.jsonl", data), purpose="batch")
    assert f.id.startswith("file-")
    assert (f.object, f.purpose, f.status) == ("file", "batch", "processed")
    assert (f.filename, f.bytes) == (f"upload-{run}.jsonl", len(data))
    assert f.expires_at == f.created_at + THIRTY_DAYS
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).content == data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert client.files.retrieve_content(f.id) == data.decode()
    res = stack.http("GET", f"/v1/files/{f.id}/content")
    assert res.status == 200 and res.body == data


def test_upload_of_other_purposes_is_not_checked_as_jsonl(stack):
    client = stack.client()
    f = client.files.create(file=("notes.txt", b"plain text, not json\n"), purpose="user_data")
    assert f.purpose == "user_data" and f.bytes == 21
    assert client.files.content(f.id).content == b"plain text, not json\n"


def test_upload_expires_after(stack):
    client = stack.client()
    data = stack.to_jsonl([stack.chat_line("exp-1", "x")])
    f = client.files.create(
        file=("e.jsonl", data), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert f.expires_at == f.created_at + 3600
    for bad, param in [
        ({"anchor": "created_at", "seconds": 3599}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": THIRTY_DAYS + 1}, "expires_after.seconds"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=("e.jsonl", data), purpose="batch", expires_after=bad)
        stack.assert_error(info.value, 400, param=param)


def test_output_expires_after(stack):
    client = stack.client()
    f = stack.upload_jsonl([stack.chat_line(f"oe-{uuid.uuid4().hex[:6]}", "x")], client=client)
    batch = stack.create_batch(f.id, client=client, output_expires_after={"anchor": "created_at", "seconds": 7200})
    batch = stack.wait_for_batch(batch.id, client=client)
    assert batch.status == "completed", batch
    out = client.files.retrieve(batch.output_file_id)
    assert out.purpose == "batch_output"
    assert out.expires_at == out.created_at + 7200, out
    with pytest.raises(openai.BadRequestError) as info:
        stack.create_batch(f.id, client=client, output_expires_after={"anchor": "created_at", "seconds": 60})
    stack.assert_error(info.value, 400, param_prefix="output_expires_after")


def test_delete(stack):
    client = stack.client()
    f = stack.upload_jsonl([stack.chat_line("del-1", "x")], client=client)
    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    for call in (
        lambda: client.files.retrieve(f.id),
        lambda: client.files.content(f.id),
        lambda: client.files.delete(f.id),
        lambda: stack.create_batch(f.id, client=client),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        stack.assert_error(info.value, 404)
    assert f.id not in {x.id for x in client.files.list()}


def test_deleting_the_input_file_of_a_running_batch_does_not_break_it(stack, wait_until):
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    messages = {f"dr-{run}-{i}": f"still here {i}" for i in range(6)}
    gate = f"dr-{run}"
    f = stack.upload_jsonl([stack.chat_line(c, m, mock_hold=gate) for c, m in messages.items()], client=client)
    batch = stack.create_batch(f.id, client=client)
    stack.wait_for_batch(batch.id, client=client, statuses=("in_progress",))  # its lines wait at the gate
    client.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    stack.mock().release(gate)
    done = stack.wait_for_batch(batch.id, client=client)
    assert done.status == "completed", done
    assert done.input_file_id == f.id
    output = stack.read_file(done.output_file_id, client=client)
    assert sorted(line["custom_id"] for line in output) == sorted(messages)
