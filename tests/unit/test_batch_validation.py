"""Line validation by the in-process publisher: a batch ends `failed` (with errors) or `in_progress`."""

from __future__ import annotations

import json

import pytest

from service.core.config import Provider
from service.web import publisher

from .conftest import CHAT, MODEL, jsonl, line, poll


def _entries(batch: dict) -> list[tuple]:
    """``(code, param, line)`` of every error entry, after checking the entry and list shapes."""
    errors = batch["errors"]
    assert errors is not None and errors["object"] == "list", errors
    out = []
    for e in errors["data"]:
        assert set(e) == {"code", "message", "param", "line"}, e
        assert isinstance(e["message"], str) and e["message"], e
        out.append((e["code"], e["param"], e["line"]))
    return out


def _assert_failed(batch: dict) -> None:
    assert batch["status"] == "failed", batch
    assert isinstance(batch["failed_at"], int) and batch["failed_at"] >= batch["created_at"]
    assert batch["in_progress_at"] is None
    assert batch["cancelling_at"] is None and batch["cancelled_at"] is None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["request_counts"]["completed"] == 0 and batch["request_counts"]["failed"] == 0


async def _fails_with(api, content: bytes) -> list[tuple]:
    batch = await api.run_batch(content)
    _assert_failed(batch)
    return _entries(batch)


async def test_valid_file_reaches_in_progress(api):
    batch = await api.run_batch(jsonl([line("a"), line("b"), line("c")]))
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert batch["model"] == MODEL
    assert batch["errors"] is None
    assert isinstance(batch["in_progress_at"], int) and batch["in_progress_at"] >= batch["created_at"]
    assert batch["failed_at"] is None
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600


async def test_blank_lines_and_crlf_are_tolerated(api):
    rows = ["", json.dumps(line("a")), "   ", json.dumps(line("b")), "", "\t", json.dumps(line("c"))]
    content = "\ufeff".encode() + jsonl(rows, eol="\r\n") + b"\r\n\n"
    batch = await api.run_batch(content)
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == 3
    assert batch["model"] == MODEL


async def test_missing_final_newline_is_tolerated(api):
    content = (json.dumps(line("a")) + "\n" + json.dumps(line("b"))).encode()
    batch = await api.run_batch(content)
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == 2


async def test_model_comes_from_the_lines(api):
    batch = await api.run_batch(jsonl([line("a", model="my-model-1"), line("b", model="my-model-1")]))
    assert batch["status"] == "in_progress", batch
    assert batch["model"] == "my-model-1"


async def test_line_two_not_json(api):
    content = jsonl([line("a"), "{this is not json", line("c")])
    assert await _fails_with(api, content) == [("invalid_json_line", None, 2)]


async def test_line_that_is_a_json_array(api):
    content = jsonl([line("a"), json.dumps([line("b")])])
    assert await _fails_with(api, content) == [("invalid_json_line", None, 2)]


@pytest.mark.parametrize("value", ['"just a string"', "42", "null", "true"])
async def test_line_that_is_a_json_scalar(api, value):
    content = jsonl([line("a"), value])
    assert await _fails_with(api, content) == [("invalid_json_line", None, 2)]


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
async def test_missing_required_field(api, field):
    bad = line("b")
    del bad[field]
    content = jsonl([line("a"), bad])
    assert await _fails_with(api, content) == [("missing_required_parameter", field, 2)]


async def test_missing_field_on_first_line(api):
    bad = line("a")
    del bad["custom_id"]
    assert await _fails_with(api, jsonl([bad, line("b")])) == [("missing_required_parameter", "custom_id", 1)]


async def test_duplicate_custom_id_reports_second_occurrence(api):
    content = jsonl([line("a"), line("b"), line("a"), line("c")])
    assert await _fails_with(api, content) == [("duplicate_custom_id", "custom_id", 3)]


async def test_duplicate_custom_id_each_repeat_reported(api):
    content = jsonl([line("x"), line("x"), line("y"), line("x")])
    assert await _fails_with(api, content) == [
        ("duplicate_custom_id", "custom_id", 2),
        ("duplicate_custom_id", "custom_id", 4),
    ]


@pytest.mark.parametrize("method", ["GET", "post", "PUT", "DELETE"])
async def test_invalid_method(api, method):
    content = jsonl([line("a"), line("b", method=method)])
    assert await _fails_with(api, content) == [("invalid_method", "method", 2)]


@pytest.mark.parametrize(
    "url",
    ["/v1/embeddings", "/v1/chat/completions/", "https://api.openai.com/v1/chat/completions", "/chat/completions"],
)
async def test_url_mismatch(api, url):
    content = jsonl([line("a", url=url), line("b")])
    assert await _fails_with(api, content) == [("invalid_url", "url", 1)]


async def test_url_must_match_the_batch_endpoint_not_just_any_endpoint(api):
    # Lines for /v1/chat/completions are invalid in a batch for /v1/embeddings.
    f = await api.upload_ok(jsonl([line("a"), line("b")]))
    b = (await api.create_batch(f["id"], endpoint="/v1/embeddings")).ok()
    batch = await api.wait_batch(b["id"])
    _assert_failed(batch)
    assert _entries(batch) == [("invalid_url", "url", 1), ("invalid_url", "url", 2)]


async def test_body_without_model(api):
    content = jsonl([line("a"), line("b", model=None)])
    assert await _fails_with(api, content) == [("invalid_request", "body.model", 2)]


async def test_body_with_null_model(api):
    bad = line("b")
    bad["body"]["model"] = None
    assert await _fails_with(api, jsonl([line("a"), bad])) == [("invalid_request", "body.model", 2)]


async def test_stream_true_unsupported(api):
    content = jsonl([line("a"), line("b", stream=True)])
    assert await _fails_with(api, content) == [("streaming_unsupported", "body.stream", 2)]


async def test_stream_false_is_fine(api):
    batch = await api.run_batch(jsonl([line("a", stream=False), line("b")]))
    assert batch["status"] == "in_progress", batch


async def test_too_many_lines(api):
    limit = api.settings.max_batch_lines
    content = jsonl([line(f"r{i}") for i in range(limit + 1)])
    assert await _fails_with(api, content) == [("too_many_tasks", None, None)]


async def test_exactly_max_lines_is_fine(api):
    limit = api.settings.max_batch_lines
    batch = await api.run_batch(jsonl([line(f"r{i}") for i in range(limit)]))
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == limit


async def test_blank_lines_do_not_count_towards_max_lines(api):
    limit = api.settings.max_batch_lines
    rows = []
    for i in range(limit):
        rows += [json.dumps(line(f"r{i}")), ""]
    batch = await api.run_batch(jsonl(rows))
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == limit


async def test_several_bad_lines_reported_together(make_api):
    api = await make_api(max_batch_lines=20)
    no_url = line("d")
    del no_url["url"]
    rows = [
        line("a"),  # 1 ok
        "not json",  # 2
        line("b"),  # 3 ok
        line("c", method="GET"),  # 4
        no_url,  # 5
        line("a"),  # 6 duplicate of line 1
        line("e", stream=True),  # 7
        line("f", model=None),  # 8
        line("g", url="/v1/embeddings"),  # 9
        line("h"),  # 10 ok
    ]
    assert await _fails_with(api, jsonl(rows)) == [
        ("invalid_json_line", None, 2),
        ("invalid_method", "method", 4),
        ("missing_required_parameter", "url", 5),
        ("duplicate_custom_id", "custom_id", 6),
        ("streaming_unsupported", "body.stream", 7),
        ("invalid_request", "body.model", 8),
        ("invalid_url", "url", 9),
    ]


async def test_line_numbers_count_blank_lines(api):
    rows = [json.dumps(line("a")), "", "", "garbage", "", json.dumps(line("b", method="GET"))]
    content = jsonl(rows, eol="\r\n")
    assert await _fails_with(api, content) == [("invalid_json_line", None, 4), ("invalid_method", "method", 6)]


async def test_failed_batch_keeps_zero_total_and_input_file(api):
    f = await api.upload_ok(jsonl([line("a"), "nope"]))
    b = (await api.create_batch(f["id"])).ok()
    batch = await api.wait_batch(b["id"])
    _assert_failed(batch)
    # The input file is untouched and still readable by its owner.
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.status == 200 and resp.body == jsonl([line("a"), "nope"])


@pytest.mark.parametrize("custom_id", [123, "", None, ["a"]])
async def test_custom_id_must_be_a_non_empty_string(api, custom_id):
    bad = line("b")
    bad["custom_id"] = custom_id
    batch = await api.run_batch(jsonl([line("a"), bad]))
    _assert_failed(batch)
    assert _entries(batch) == [("invalid_type", "custom_id", 2)]


@pytest.mark.parametrize("body", ['"text"', "[1, 2]", "42"])
async def test_body_must_be_an_object(api, body):
    raw = '{"custom_id": "b", "method": "POST", "url": "%s", "body": %s}' % (CHAT, body)
    batch = await api.run_batch(jsonl([line("a"), raw]))
    _assert_failed(batch)
    assert _entries(batch) == [("invalid_type", "body", 2)]


@pytest.mark.parametrize("model", [123, "", ["gpt"], True])
async def test_model_must_be_a_non_empty_string(api, model):
    assert await _fails_with(api, jsonl([line("a"), line("b", model=model)])) == [("invalid_request", "body.model", 2)]


async def test_mixed_models_allowed_and_model_is_the_first_lines(api):
    # README: one batch may mix models; batch.model is the first line's.
    batch = await api.run_batch(jsonl([line("a", model="model-one"), line("b", model="model-two")]))
    assert batch["status"] == "in_progress", batch
    assert batch["model"] == "model-one"


async def test_input_content_gone_before_validation(api):
    f = await api.upload_ok(jsonl([line("a")]))
    api.storage.hold()
    b = (await api.create_batch(f["id"])).ok()
    await poll(lambda: _is_set(api.storage.reading), message="publisher to start reading the input")
    [stored] = api.storage.stored_files()
    (api.storage.root / "files" / stored).unlink()
    api.storage.release()
    batch = await api.wait_batch(b["id"])
    _assert_failed(batch)
    assert _entries(batch) == [("invalid_request", "file_id", None)]


async def _is_set(event) -> bool:
    return event.is_set()


# The duplicate check keeps 64-bit hashes of the custom_ids, not the ids: a hash seen twice is
# confirmed by a second pass over the file, so a collision never fails a valid file.


async def _big_api(make_api, lines: int, **overrides):
    return await make_api(
        max_batch_lines=lines, max_batch_file_bytes=8 * 1024 * 1024, max_file_bytes=8 * 1024 * 1024, **overrides
    )


async def test_duplicate_far_apart_is_reported(make_api):
    # Over a megabyte: the two lines are several storage reads apart.
    api = await _big_api(make_api, 12_000)
    rows = [line(f"req-{i}") for i in range(12_000)]
    rows[11_990] = line("req-3")
    assert await _fails_with(api, jsonl(rows)) == [("duplicate_custom_id", "custom_id", 11_991)]


@pytest.fixture(params=["real hashes", "every hash colliding"])
def colliding(request, monkeypatch):
    if request.param == "every hash colliding":
        monkeypatch.setattr(publisher, "id_hash", lambda custom_id: 7)


async def test_hash_collisions_do_not_fail_a_valid_file(make_api, colliding):
    api = await _big_api(make_api, 3000)
    batch = await api.run_batch(jsonl([line(f"req-{i}") for i in range(3000)]))
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == 3000


async def test_duplicates_among_collisions_are_exact(make_api, colliding):
    served = Provider(name="default", base_url="http://127.0.0.1:9", models=(MODEL,))
    api = await _big_api(make_api, 3000, providers=(served,))
    rows = [line(f"req-{i}") for i in range(3000)]
    rows[10] = line("x", model="nobody-serves-this")  # 11: model_not_found, and "x" is not taken
    rows[20] = line("x")  # 21: the first valid "x", not a duplicate
    rows[2000] = line("x")  # 2001: a duplicate of line 21
    rows[2500] = line("req-5", model="nobody-serves-this")  # 2501: the duplicate is reported first
    rows[2600] = line("y", model="nobody-serves-this")  # 2601: model_not_found
    assert await _fails_with(api, jsonl(rows)) == [
        ("model_not_found", "body.model", 11),
        ("duplicate_custom_id", "custom_id", 2001),
        ("duplicate_custom_id", "custom_id", 2501),
        ("model_not_found", "body.model", 2601),
    ]


async def test_errors_are_capped_at_the_first_thousand(make_api, colliding):
    api = await _big_api(make_api, 3000)
    rows = [line(f"req-{i}") for i in range(3000)]
    for i in range(1, 3000, 2):
        rows[i] = line("req-0") if i % 4 == 1 else "not json"
    errors = await _fails_with(api, jsonl(rows))
    assert len(errors) == 1000
    assert errors[:2] == [("duplicate_custom_id", "custom_id", 2), ("invalid_json_line", None, 4)]
    assert errors[-1] == ("invalid_json_line", None, 2000)
