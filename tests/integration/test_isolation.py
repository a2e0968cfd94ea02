"""Every token sees only its own files and batches; other ids look like unknown ids (404)."""

from __future__ import annotations

import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_token_b_cannot_see_or_touch_token_a_objects(stack):
    a = stack.client(token="tok-a")
    b = stack.client(token="tok-b")
    run = uuid.uuid4().hex[:8]

    a_file = stack.upload_jsonl([stack.chat_line(f"iso-{run}-{i}", f"iso {i}") for i in range(3)], client=a)
    done = stack.wait_for_batch(stack.create_batch(a_file.id, client=a).id, client=a)
    assert done.status == "completed", done
    # A batch that is still running: its lines wait at the mock's gate while tok-b tries to cancel it.
    gate = f"iso-{run}"
    slow_file = stack.upload_jsonl(
        [stack.chat_line(f"iso-slow-{run}-{i}", "slow", mock_hold=gate) for i in range(2)], client=a
    )
    running = stack.create_batch(slow_file.id, client=a)

    a_files = [a_file.id, slow_file.id, done.output_file_id]
    for file_id in a_files:
        with pytest.raises(openai.NotFoundError) as info:
            b.files.retrieve(file_id)
        stack.assert_error(info.value, 404)
        with pytest.raises(openai.NotFoundError):
            b.files.content(file_id)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            b.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")

    for batch_id in (done.id, running.id):
        with pytest.raises(openai.NotFoundError) as info:
            b.batches.retrieve(batch_id)
        stack.assert_error(info.value, 404)
        with pytest.raises(openai.NotFoundError):
            b.batches.cancel(batch_id)

    # Raw HTTP with tok-b: same answers as for ids that do not exist.
    assert stack.http("GET", f"/v1/files/{a_file.id}/content", token="tok-b").status == 404
    assert stack.http("DELETE", f"/v1/files/{a_file.id}", token="tok-b").status == 404
    assert stack.http("POST", f"/v1/batches/{running.id}/cancel", token="tok-b").status == 404

    b_file_ids = {f.id for f in b.files.list()}
    b_batch_ids = {x.id for x in b.batches.list(limit=100)}
    assert not b_file_ids & set(a_files)
    assert not b_batch_ids & {done.id, running.id}
    for purpose in ("batch", "batch_output"):
        assert not {f.id for f in b.files.list(purpose=purpose)} & set(a_files)

    # Nothing tok-b did had an effect on tok-a's objects.
    assert a.files.retrieve(a_file.id).id == a_file.id
    assert a.files.content(a_file.id).text
    still = a.batches.retrieve(running.id)
    assert still.status in ("validating", "in_progress"), still
    stack.mock().release(gate)
    assert stack.wait_for_batch(running.id, client=a).status == "completed"

    # tok-b's own objects are equally invisible to tok-a.
    b_file = stack.upload_jsonl([stack.chat_line(f"iso-b-{run}", "mine")], client=b)
    b_batch = stack.create_batch(b_file.id, client=b)
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(b_file.id)
    with pytest.raises(openai.NotFoundError):
        a.batches.retrieve(b_batch.id)
    assert b_batch.id not in {x.id for x in a.batches.list(limit=100)}
    assert b_file.id not in {f.id for f in a.files.list()}
    assert b_batch.id in {x.id for x in b.batches.list(limit=100)}
    assert stack.wait_for_batch(b_batch.id, client=b).status == "completed"

    # The owner can delete its file; afterwards it is gone for the owner too.
    deleted = a.files.delete(a_file.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (a_file.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(a_file.id)
    assert a_file.id not in {f.id for f in a.files.list()}


def test_tokens_never_reach_logs_or_upstream(stack_factory):
    tokens = ("alpha-secret-7f3c9e", "beta-secret-2d8a41")
    stack = stack_factory.start(name="secrets", tokens=tokens, env={"SLUICE_LOG_LEVEL": "debug"})
    client = stack.client(token=tokens[0])
    rows = [stack.chat_line(f"sec-{i}", "psst", mock_status=[200, 404][i % 2]) for i in range(4)]
    _, created = stack.submit(rows, client=client)
    assert stack.wait_for_batch(created.id, client=client).status == "completed"
    stack.client(token=tokens[1]).files.list()
    wrong = "gamma-wrong-5b6e0d"
    with pytest.raises(openai.AuthenticationError):
        stack.client(token=wrong).batches.list()
    assert stack.http("GET", "/v1/batches", token=None, headers={"Authorization": f"Bearer {wrong}"}).status == 401

    assert stack.mock_stats()["authorization"] == ["Bearer upstream-secret"]
    stack.runner.stop([p for p in stack.processes if p.name != "redis"])  # flush every log
    scanned = 0
    for proc in stack.processes:
        if proc.name in ("redis", "mock-provider"):
            continue
        text = proc.log_path.read_text(errors="replace")
        scanned += len(text)
        for secret in (*tokens, wrong, "upstream-secret"):
            assert secret not in text, f"{secret!r} appears in the log of {proc.name}"
    assert scanned > 0, "the Sluice processes wrote no logs at all: nothing was checked"
