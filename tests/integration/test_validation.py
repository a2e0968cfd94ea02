"""Input validation: at upload time (400) and before a batch runs (status ``failed`` with ``errors``).

These tests use their own stack (SLUICE_MAX_BATCH_LINES=100) so that the mock's request counter
only moves for the batches created here.
"""

from __future__ import annotations

import json
import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAX_LINES = 100
MAX_FILE_BYTES = 100_000
GOOD_LINES = 20


@pytest.fixture(scope="module")
def vstack(module_stack_factory):
    return module_stack_factory.start(
        name="validation", max_batch_lines=MAX_LINES, env={"SLUICE_MAX_BATCH_FILE_BYTES": str(MAX_FILE_BYTES)}
    )


def good_rows(stack, run: str, n: int = GOOD_LINES) -> list[dict]:
    return [stack.chat_line(f"{run}-{i}", f"valid line {i}") for i in range(n)]


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def _with_body(row: dict, **changes) -> dict:
    body = dict(row["body"])
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return {**row, "body": body}


def run_failing_batch(stack, rows):
    """Upload ``rows``, create a batch, wait for it; check the generic ``failed`` shape; return it."""
    client = stack.client()
    before = stack.mock_stats()["requests"]
    f = stack.upload_jsonl(rows, client=client)
    created = stack.create_batch(f.id, client=client)
    assert created.status == "validating", created
    batch = stack.wait_for_batch(created.id, client=client, timeout=30)
    assert batch.status == "failed", batch
    assert batch.failed_at is not None, batch
    assert batch.created_at <= batch.failed_at, batch
    assert batch.in_progress_at is None, batch
    assert batch.finalizing_at is None and batch.completed_at is None, batch
    assert batch.output_file_id is None and batch.error_file_id is None, batch
    assert batch.errors is not None and batch.errors.data, batch
    assert batch.errors.object == "list", batch.errors
    for err in batch.errors.data:
        assert isinstance(err.code, str) and err.code, err
        assert isinstance(err.message, str) and err.message, err
    after = stack.mock_stats()["requests"]
    assert after == before, f"a batch that failed validation sent {after - before} request(s) upstream"
    return batch


def _entries(batch) -> list[tuple]:
    return [(e.code, e.param, e.line) for e in batch.errors.data]


BAD_LINE_CASES = {
    "not_json": (lambda row: '{"custom_id": "x", "method": "POST",', "invalid_json_line", None),
    "json_array": (lambda row: json.dumps([row]), "invalid_json_line", None),
    "json_string": (lambda row: json.dumps("just a string"), "invalid_json_line", None),
    "json_number": (lambda row: "42", "invalid_json_line", None),
    "missing_custom_id": (lambda row: _without(row, "custom_id"), "missing_required_parameter", "custom_id"),
    "missing_method": (lambda row: _without(row, "method"), "missing_required_parameter", "method"),
    "missing_url": (lambda row: _without(row, "url"), "missing_required_parameter", "url"),
    "missing_body": (lambda row: _without(row, "body"), "missing_required_parameter", "body"),
    "method_get": (lambda row: {**row, "method": "GET"}, "invalid_method", "method"),
    "wrong_url": (lambda row: {**row, "url": "/v1/embeddings"}, "invalid_url", "url"),
    "no_model": (lambda row: _with_body(row, model=None), "invalid_request", "body.model"),
    "stream_true": (lambda row: _with_body(row, stream=True), "streaming_unsupported", "body.stream"),
    "custom_id_int": (lambda row: {**row, "custom_id": 7}, "invalid_type", "custom_id"),
    "custom_id_empty": (lambda row: {**row, "custom_id": ""}, "invalid_type", "custom_id"),
    "body_string": (lambda row: {**row, "body": "model=gpt"}, "invalid_type", "body"),
    "model_int": (lambda row: _with_body(row, model=4), "invalid_request", "body.model"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINE_CASES))
def test_one_bad_line_fails_the_batch_and_sends_nothing(vstack, case):
    make_bad, code, param = BAD_LINE_CASES[case]
    run = f"{case}-{uuid.uuid4().hex[:6]}"
    rows = good_rows(vstack, run)
    # The bad line is the last one: every line is validated before any line is sent.
    rows.append(make_bad(vstack.chat_line(f"{run}-bad", "bad line")))
    batch = run_failing_batch(vstack, rows)
    bad_line_no = len(rows)
    assert (code, param, bad_line_no) in _entries(batch), _entries(batch)
    assert {e.line for e in batch.errors.data} == {bad_line_no}, _entries(batch)


def test_duplicate_custom_id(vstack):
    run = f"dup-{uuid.uuid4().hex[:6]}"
    rows = good_rows(vstack, run)
    rows.append(vstack.chat_line(f"{run}-3", "same id as line 4"))
    batch = run_failing_batch(vstack, rows)
    assert ("duplicate_custom_id", "custom_id", len(rows)) in _entries(batch), _entries(batch)
    assert {e.line for e in batch.errors.data} == {len(rows)}, _entries(batch)


def test_errors_are_reported_for_every_bad_line(vstack):
    run = f"multi-{uuid.uuid4().hex[:6]}"
    good = good_rows(vstack, run, 6)
    rows = [
        good[0],  # 1
        "{this is not json",  # 2
        good[1],  # 3
        _without(good[2], "url"),  # 4
        {**good[3], "method": "GET"},  # 5
        vstack.chat_line(good[0]["custom_id"], "duplicate of line 1"),  # 6
        good[4],  # 7
        _with_body(good[5], stream=True),  # 8
    ]
    batch = run_failing_batch(vstack, rows)
    entries = _entries(batch)
    for expected in [
        ("invalid_json_line", None, 2),
        ("missing_required_parameter", "url", 4),
        ("invalid_method", "method", 5),
        ("duplicate_custom_id", "custom_id", 6),
        ("streaming_unsupported", "body.stream", 8),
    ]:
        assert expected in entries, (expected, entries)
    assert {e.line for e in batch.errors.data} == {2, 4, 5, 6, 8}, entries


def test_too_many_lines(vstack):
    run = f"many-{uuid.uuid4().hex[:6]}"
    rows = good_rows(vstack, run, MAX_LINES + 1)
    batch = run_failing_batch(vstack, rows)
    assert [(e.code, e.line) for e in batch.errors.data] == [("too_many_tasks", None)], _entries(batch)


def test_blank_lines_are_ignored_and_the_line_limit_is_inclusive(vstack):
    client = vstack.client()
    run = f"blank-{uuid.uuid4().hex[:6]}"
    rows = good_rows(vstack, run, MAX_LINES)
    text = []
    for i, row in enumerate(rows):
        text.append(json.dumps(row))
        if i % 25 == 0:
            text.append("")
            text.append("   ")
    data = ("\n".join(text) + "\n\n\n").encode()
    before = vstack.mock_stats()["requests"]
    f = vstack.upload_jsonl(data, client=client)
    created = vstack.create_batch(f.id, client=client)
    batch = vstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == MAX_LINES
    assert batch.request_counts.completed == MAX_LINES
    output, errors = vstack.results(batch, client=client)
    assert errors == []
    assert sorted(line["custom_id"] for line in output) == sorted(r["custom_id"] for r in rows)
    assert vstack.mock_stats()["requests"] - before == MAX_LINES


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not json\n" + b'{"custom_id": "a"}\n', id="first_line_not_json"),
        pytest.param(b"", id="empty"),
    ],
)
def test_upload_rejects_non_jsonl_batch_files(vstack, content):
    client = vstack.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("input.jsonl", content), purpose="batch")
    vstack.assert_error(info.value, 400)


def test_bom_and_crlf_are_accepted(vstack):
    client = vstack.client()
    run = f"crlf-{uuid.uuid4().hex[:6]}"
    rows = good_rows(vstack, run, 5)
    data = b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n"
    f = vstack.upload_jsonl(data, client=client)
    batch = vstack.wait_for_batch(vstack.create_batch(f.id, client=client).id, client=client)
    assert batch.status == "completed", batch
    output, errors = vstack.results(batch, client=client)
    assert errors == [] and sorted(line["custom_id"] for line in output) == sorted(r["custom_id"] for r in rows)


def test_upload_over_the_size_limit_is_413(vstack):
    client = vstack.client()
    row = json.dumps(vstack.chat_line("big", "x" * 1000))
    data = "\n".join([row] * (MAX_FILE_BYTES // len(row) + 5)).encode()
    assert len(data) > MAX_FILE_BYTES
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", data), purpose="batch")
    vstack.assert_error(info.value, 413)
    # Nothing was stored.
    assert "big.jsonl" not in {f.filename for f in client.files.list()}
