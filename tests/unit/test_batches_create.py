"""POST /v1/batches: request parsing and synchronous parameter validation, and the created object."""

from __future__ import annotations

import json

import pytest

from .conftest import BATCH_FIELDS, CHAT, OMIT, TOKEN_B, good_jsonl

WINDOW_S = 24 * 3600
ENDPOINTS = [
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
]


@pytest.fixture
async def input_file(api) -> dict:
    return await api.upload_ok(good_jsonl(2))


async def _batch_count(api) -> int:
    return len((await api.request("GET", "/v1/batches")).ok()["data"])


async def test_created_batch_is_complete_validating_object(api, input_file):
    resp = await api.create_batch(input_file["id"], metadata={"project": "alpha", "run": "7"})
    b = resp.ok()
    assert set(b) == BATCH_FIELDS, sorted(set(b) ^ BATCH_FIELDS)
    assert b["id"].startswith("batch_")
    assert b["object"] == "batch"
    assert b["status"] == "validating"
    assert b["endpoint"] == CHAT
    assert b["input_file_id"] == input_file["id"]
    assert b["completion_window"] == "24h"
    assert isinstance(b["created_at"], int)
    assert b["expires_at"] == b["created_at"] + WINDOW_S
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert b["metadata"] == {"project": "alpha", "run": "7"}
    for name in (
        "model",
        "errors",
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert b[name] is None, (name, b[name])
    assert b["usage"] == {
        "input_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }
    # retrieve right away: same identity fields
    got = await api.get_batch(b["id"])
    for name in ("id", "endpoint", "input_file_id", "completion_window", "created_at", "expires_at", "metadata"):
        assert got[name] == b[name]
    assert "output_expires_after" not in got


async def test_metadata_null_and_absent(api, input_file):
    b = (await api.create_batch(input_file["id"], metadata=None)).ok()
    assert b["metadata"] is None
    b = (await api.create_batch(input_file["id"])).ok()
    assert b["metadata"] is None


async def test_metadata_empty_object(api, input_file):
    b = (await api.create_batch(input_file["id"], metadata={})).ok()
    assert b["metadata"] in ({}, None)


async def test_metadata_sixteen_pairs_at_the_size_limits_ok(api, input_file):
    metadata = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    b = (await api.create_batch(input_file["id"], metadata=metadata)).ok()
    assert b["metadata"] == metadata
    assert (await api.get_batch(b["id"]))["metadata"] == metadata


async def test_metadata_unicode_echoed(api, input_file):
    metadata = {"ключ": "значение ✓", "emoji": "🚀"}
    b = (await api.create_batch(input_file["id"], metadata=metadata)).ok()
    assert b["metadata"] == metadata


@pytest.mark.parametrize(
    "value,kind",
    [(["a"], "array"), (1, "integer"), (True, "boolean"), ({"a": "b"}, "object"), (None, "null"), (1.5, "number")],
)
async def test_metadata_non_string_value(api, input_file, value, kind):
    resp = await api.create_batch(input_file["id"], metadata={"ok": "fine", "tags": value})
    err = resp.error(400, param="metadata.tags", code="invalid_type")
    assert "metadata.tags" in err["message"]
    assert await _batch_count(api) == 0


@pytest.mark.parametrize(
    "metadata,param",
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"key": "v" * 513}, "metadata.key"),
    ],
)
async def test_metadata_limits(api, input_file, metadata, param):
    resp = await api.create_batch(input_file["id"], metadata=metadata)
    resp.error(400, param=param)
    assert await _batch_count(api) == 0


@pytest.mark.parametrize("metadata", [["a", "b"], "tags", 3])
async def test_metadata_not_an_object(api, input_file, metadata):
    (await api.create_batch(input_file["id"], metadata=metadata)).error(400, param="metadata", code="invalid_type")


@pytest.mark.parametrize("body", [b"{not json", b'{"input_file_id": ', b"\xff\xfe", b"nul", b"{'a': 1}"])
async def test_malformed_json(api, body):
    resp = await api.request("POST", "/v1/batches", data=body, headers={"Content-Type": "application/json"})
    resp.error(400)
    assert await _batch_count(api) == 0


@pytest.mark.parametrize("value", [[], [1, 2], "string", 42, None, True])
async def test_json_that_is_not_an_object(api, value):
    resp = await api.request(
        "POST", "/v1/batches", data=json.dumps(value).encode(), headers={"Content-Type": "application/json"}
    )
    resp.error(400)


async def test_empty_body(api):
    resp = await api.request("POST", "/v1/batches", data=b"", headers={"Content-Type": "application/json"})
    resp.error(400)


async def test_form_encoded_body_is_rejected(api, input_file):
    resp = await api.request(
        "POST", "/v1/batches", data={"input_file_id": input_file["id"], "endpoint": CHAT, "completion_window": "24h"}
    )
    resp.error(400)
    assert await _batch_count(api) == 0


async def test_wrong_content_type_with_json_body_is_rejected(api, input_file):
    body = json.dumps({"input_file_id": input_file["id"], "endpoint": CHAT, "completion_window": "24h"}).encode()
    resp = await api.request("POST", "/v1/batches", data=body, headers={"Content-Type": "text/plain"})
    resp.error(400)
    assert await _batch_count(api) == 0


async def test_multipart_body_is_rejected(api, input_file):
    from aiohttp import FormData

    form = FormData()
    form.add_field("input_file_id", input_file["id"])
    form.add_field("file", b"x", filename="x")
    resp = await api.request("POST", "/v1/batches", data=form)
    resp.error(400)


@pytest.mark.parametrize("missing", ["input_file_id", "endpoint", "completion_window"])
@pytest.mark.parametrize("how", ["absent", "null"])
async def test_missing_required_parameter(api, input_file, missing, how):
    resp = await api.create_batch(**{"input_file_id": input_file["id"], missing: OMIT if how == "absent" else None})
    err = resp.error(400, param=missing, code="missing_required_parameter")
    assert missing in err["message"]
    assert await _batch_count(api) == 0


@pytest.mark.parametrize(
    "name,value", [("input_file_id", 123), ("endpoint", ["/v1/chat/completions"]), ("completion_window", 24)]
)
async def test_wrong_type_parameter(api, input_file, name, value):
    resp = await api.create_batch(**{"input_file_id": input_file["id"], name: value})
    resp.error(400, param=name, code="invalid_type")


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/chat",
        "/chat/completions",
        "v1/chat/completions",
        "/v1/chat/completions/",
        "",
        "/v1/audio/speech",
        "/V1/CHAT/COMPLETIONS",
    ],
)
async def test_bad_endpoint(api, input_file, endpoint):
    resp = await api.create_batch(input_file["id"], endpoint=endpoint)
    resp.error(400, param="endpoint", code="invalid_value")
    assert await _batch_count(api) == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_every_supported_endpoint_accepted(api, input_file, endpoint):
    b = (await api.create_batch(input_file["id"], endpoint=endpoint)).ok()
    assert b["endpoint"] == endpoint


@pytest.mark.parametrize("window", ["0h", "169h", "8d", "0d", "30m", "1.5h", "24", "24H", " 24h", "h", "01h", ""])
async def test_bad_completion_window(api, input_file, window):
    resp = await api.create_batch(input_file["id"], completion_window=window)
    resp.error(400, param="completion_window", code="invalid_value")
    assert await _batch_count(api) == 0


@pytest.mark.parametrize("name", ["model", "input_file", "Metadata", "priority"])
async def test_unknown_top_level_field(api, input_file, name):
    resp = await api.create_batch(input_file["id"], **{name: "x"})
    resp.error(400, param=name, code="unknown_parameter")
    assert await _batch_count(api) == 0


@pytest.mark.parametrize("file_id", ["file-0000000fffff0123456789ab", "file-nope", "../etc/passwd", ""])
async def test_unknown_input_file_is_404(api, file_id):
    resp = await api.create_batch(file_id)
    resp.error(404, param="input_file_id")
    assert await _batch_count(api) == 0


async def test_deleted_input_file_is_404(api, input_file):
    (await api.request("DELETE", f"/v1/files/{input_file['id']}")).ok()
    (await api.create_batch(input_file["id"])).error(404, param="input_file_id")


async def test_other_tokens_input_file_is_404(api, input_file):
    resp = await api.create_batch(input_file["id"], token=TOKEN_B)
    resp.error(404, param="input_file_id")
    assert len((await api.request("GET", "/v1/batches", token=TOKEN_B)).ok()["data"]) == 0


@pytest.mark.parametrize("purpose", ["user_data", "assistants", "fine-tune"])
async def test_input_file_with_wrong_purpose_is_400(api, purpose):
    f = await api.upload_ok(good_jsonl(), purpose=purpose)
    resp = await api.create_batch(f["id"])
    resp.error(400, param="input_file_id")
    assert await _batch_count(api) == 0


async def test_output_expires_after_valid(api, input_file):
    b = (await api.create_batch(input_file["id"], output_expires_after={"anchor": "created_at", "seconds": 3600})).ok()
    assert b["status"] == "validating"
    assert "output_expires_after" not in b


@pytest.mark.parametrize(
    "value,param",
    [
        ({"anchor": "created_at", "seconds": 10}, "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 2592001}, "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": "soon"}, "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": True}, "output_expires_after.seconds"),
        ({"anchor": "created_at"}, "output_expires_after.seconds"),
        ({"anchor": "other", "seconds": 3600}, "output_expires_after.anchor"),
        ({"seconds": 3600}, "output_expires_after.anchor"),
        ("3600", "output_expires_after"),
    ],
)
async def test_output_expires_after_invalid(api, input_file, value, param):
    resp = await api.create_batch(input_file["id"], output_expires_after=value)
    resp.error(400, param=param)
    assert await _batch_count(api) == 0


async def test_many_batches_on_one_file(api, input_file):
    ids = [(await api.create_batch(input_file["id"])).ok()["id"] for _ in range(3)]
    assert len(set(ids)) == 3
    for batch_id in ids:
        b = await api.wait_batch(batch_id)
        assert b["status"] == "in_progress"
        assert b["request_counts"]["total"] == 2


async def test_oversized_json_body_is_413(api, input_file):
    body = json.dumps(
        {
            "input_file_id": input_file["id"],
            "endpoint": CHAT,
            "completion_window": "24h",
            "metadata": {"k": "v" * (1024 * 1024 + 10)},
        }
    ).encode()
    resp = await api.request("POST", "/v1/batches", data=body, headers={"Content-Type": "application/json"})
    resp.error(413)
    assert await _batch_count(api) == 0


async def test_unknown_headers_are_ignored(api, input_file):
    headers = {
        "OpenAI-Organization": "org-x",
        "OpenAI-Project": "proj-y",
        "x-stainless-retry-count": "0",
        "x-stainless-lang": "python",
        "accept": "application/json",
        "user-agent": "OpenAI/Python 3.54.0",
    }
    body = {"input_file_id": input_file["id"], "endpoint": CHAT, "completion_window": "24h"}
    b = (await api.request("POST", "/v1/batches", json=body, headers=headers)).ok()
    assert b["status"] == "validating"


# --------------------------------------------------------------------------------------------
# Sluice extensions: completion windows from 1h to 7d, priorities


@pytest.mark.parametrize(
    ("window", "hours"),
    [("1h", 1), ("6h", 6), ("24h", 24), ("48h", 48), ("168h", 168), ("1d", 24), ("2d", 48), ("7d", 168)],
)
async def test_completion_windows_from_1h_to_7d(api, input_file, window, hours):
    b = (await api.create_batch(input_file["id"], completion_window=window)).ok()
    assert b["completion_window"] == window
    assert b["expires_at"] - b["created_at"] == hours * 3600


async def _create_with(api, file_id, headers=None, **extra):
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **extra}
    return await api.request("POST", "/v1/batches", json=body, headers=headers)


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
async def test_priority_header_is_echoed_in_metadata(api, input_file, priority):
    b = (await _create_with(api, input_file["id"], {"x-sluice-priority": priority}, metadata={"k": "v"})).ok()
    assert b["metadata"] == {"k": "v", "sluice_priority": priority}
    assert (await api.get_batch(b["id"]))["metadata"] == {"k": "v", "sluice_priority": priority}


async def test_priority_from_metadata_as_the_sdk_sends_it(api, input_file):
    b = (await _create_with(api, input_file["id"], metadata={"sluice_priority": "low"})).ok()
    assert b["metadata"] == {"sluice_priority": "low"}
    same = (
        await _create_with(api, input_file["id"], {"x-sluice-priority": "low"}, metadata={"sluice_priority": "low"})
    ).ok()
    assert same["metadata"] == {"sluice_priority": "low"}


async def test_no_priority_leaves_metadata_alone(api, input_file):
    assert (await _create_with(api, input_file["id"])).ok()["metadata"] is None


@pytest.mark.parametrize(
    ("headers", "metadata", "param"),
    [
        ({"x-sluice-priority": "urgent"}, None, "x-sluice-priority"),
        ({"x-sluice-priority": "HIGH"}, None, "x-sluice-priority"),
        ({"x-sluice-priority": ""}, None, "x-sluice-priority"),
        (None, {"sluice_priority": "1"}, "metadata.sluice_priority"),
        ({"x-sluice-priority": "high"}, {"sluice_priority": "low"}, "x-sluice-priority"),
    ],
)
async def test_bad_priority_is_a_400(api, input_file, headers, metadata, param):
    extra = {"metadata": metadata} if metadata is not None else {}
    resp = await _create_with(api, input_file["id"], headers, **extra)
    resp.error(400, param=param, code="invalid_value")
    assert await _batch_count(api) == 0
