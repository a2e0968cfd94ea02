"""Synchronous API errors: create-time validation, unknown ids, authentication, malformed bodies."""

from __future__ import annotations

import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def batch_file(stack):
    run = uuid.uuid4().hex[:8]
    return stack.upload_jsonl([stack.chat_line(f"err-{run}-{i}", f"m{i}") for i in range(2)])


def _batch_ids(stack, client) -> set[str]:
    return {b.id for b in client.batches.list(limit=100)}


# ---- create-time validation


@pytest.mark.parametrize("endpoint", ["/v1/nope", "/v2/chat/completions", "chat/completions", ""])
def test_create_rejects_unknown_endpoint(stack, batch_file, endpoint):
    client = stack.client()
    before = _batch_ids(stack, client)
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=batch_file.id, endpoint=endpoint, completion_window="24h")
    stack.assert_error(info.value, 400, param="endpoint")
    assert _batch_ids(stack, client) == before, "a rejected create still created a batch"


@pytest.mark.parametrize("window", ["0h", "8d", "169h", "24", ""])
def test_create_rejects_completion_window_sluice_does_not_offer(stack, batch_file, window):
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window=window)
    stack.assert_error(info.value, 400, param="completion_window")


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"n": 1}, id="int_value"),
        pytest.param({"tags": ["a", "b"]}, id="list_value"),
        pytest.param({"x": None}, id="null_value"),
        pytest.param({f"k{i}": "v" for i in range(17)}, id="17_pairs"),
        pytest.param({"k" * 65: "v"}, id="key_65_chars"),
        pytest.param({"k": "v" * 513}, id="value_513_chars"),
        pytest.param(["not", "a", "map"], id="not_an_object"),
        pytest.param("text", id="string"),
    ],
)
def test_create_rejects_bad_metadata(stack, batch_file, metadata):
    client = stack.client()
    before = _batch_ids(stack, client)
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
        )
    stack.assert_error(info.value, 400, param_prefix="metadata")
    assert _batch_ids(stack, client) == before


def test_create_accepts_metadata_at_the_limits(stack, batch_file):
    client = stack.client()
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert all(len(k) == 64 for k in metadata)
    batch = client.batches.create(
        input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
    )
    assert batch.metadata == metadata
    assert client.batches.retrieve(batch.id).metadata == metadata
    done = stack.wait_for_batch(batch.id, client=client)
    assert done.status == "completed", done


def test_create_with_explicit_null_metadata(stack, batch_file):
    client = stack.client()
    batch = client.batches.create(
        input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=None
    )
    assert batch.metadata in (None, {})
    assert stack.wait_for_batch(batch.id, client=client).status == "completed"


def test_create_with_unknown_input_file_is_404(stack):
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.batches.create(
            input_file_id="file-doesnotexist0000", endpoint="/v1/chat/completions", completion_window="24h"
        )
    stack.assert_error(info.value, 404)


def test_create_with_non_batch_purpose_input_file_is_400(stack):
    client = stack.client()
    f = stack.upload_jsonl([stack.chat_line("ud-1", "x")], client=client, purpose="user_data", filename="data.jsonl")
    assert f.purpose == "user_data"
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    stack.assert_error(info.value, 400)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, id="no_input_file_id"),
        pytest.param({"input_file_id": "FILE", "completion_window": "24h"}, id="no_endpoint"),
        pytest.param({"input_file_id": "FILE", "endpoint": "/v1/chat/completions"}, id="no_completion_window"),
        pytest.param(
            {"input_file_id": 12, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, id="int_file_id"
        ),
    ],
)
def test_create_missing_or_mistyped_fields_are_400(stack, batch_file, body):
    body = {k: (batch_file.id if v == "FILE" else v) for k, v in body.items()}
    stack.assert_error(stack.http("POST", "/v1/batches", json_body=body), 400)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"input_file_id": "file-1", "endpoint": ', id="truncated"),
        pytest.param(b"not json at all", id="garbage"),
        pytest.param(b"[1, 2, 3]", id="array"),
        pytest.param(b'"a string"', id="string"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00", id="not_utf8"),
    ],
)
def test_malformed_json_body_on_create_is_400(stack, raw):
    res = stack.http("POST", "/v1/batches", data=raw, headers={"Content-Type": "application/json"})
    stack.assert_error(res, 400)


def test_unknown_ids_are_404(stack):
    client = stack.client()
    calls = [
        lambda: client.batches.retrieve("batch_doesnotexist"),
        lambda: client.batches.cancel("batch_doesnotexist"),
        lambda: client.files.retrieve("file-doesnotexist"),
        lambda: client.files.content("file-doesnotexist"),
        lambda: client.files.delete("file-doesnotexist"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as info:
            call()
        stack.assert_error(info.value, 404)


def test_upload_with_unknown_purpose_is_400(stack):
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="not-a-purpose")
    stack.assert_error(info.value, 400)


def test_upload_without_file_part_is_400(stack):
    boundary = "sluiceboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--{boundary}--\r\n'
    ).encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    res = stack.http("POST", "/v1/files", data=body, headers=headers)
    stack.assert_error(res, 400)


# ---- authentication


def test_bad_token_is_401_invalid_api_key(stack):
    client = stack.client(token="tok-wrong")
    calls = [
        lambda: client.batches.list(),
        lambda: client.files.list(),
        lambda: client.batches.retrieve("batch_x"),
        lambda: client.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="batch"),
        lambda: client.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h"),
    ]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        stack.assert_error(info.value, 401, code="invalid_api_key")
        assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer "}, id="empty_bearer"),
        pytest.param({"Authorization": "tok-a"}, id="no_bearer_scheme"),
        pytest.param({"Authorization": "Basic dG9rLWE6"}, id="basic"),
        pytest.param({"Authorization": "Bearer tok-a,tok-b"}, id="token_list"),
        pytest.param({"Authorization": "Bearer tok-"}, id="prefix"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/batches", "/v1/files", "/batches", "/files"])
def test_missing_or_malformed_token_is_401(stack, headers, path):
    res = stack.http("GET", path, token=None, headers=headers)
    stack.assert_error(res, 401, code="invalid_api_key")


def test_401_on_post_before_body_is_read(stack):
    res = stack.http(
        "POST",
        "/v1/batches",
        token=None,
        json_body={"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    stack.assert_error(res, 401, code="invalid_api_key")


def test_both_configured_tokens_work(stack):
    for token in stack.tokens:
        res = stack.http("GET", "/v1/batches?limit=1", token=token)
        assert res.status == 200, res.body[:300]
        body = res.json()
        assert body["object"] == "list" and isinstance(body["data"], list) and isinstance(body["has_more"], bool)


def test_healthz_needs_no_token(stack):
    res = stack.http("GET", "/healthz", token=None)
    assert res.status == 200
