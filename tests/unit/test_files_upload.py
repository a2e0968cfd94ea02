"""POST /v1/files: multipart parsing, purpose/expiry validation, batch-file checks, limits, round trip."""

from __future__ import annotations

import json

import pytest

from .conftest import FILE_FIELDS, good_jsonl, jsonl, line

BATCH_FILE_TTL_S = 30 * 24 * 3600


async def _listed_ids(api) -> list[str]:
    return [f["id"] for f in (await api.list_files()).ok()["data"]]


async def test_upload_returns_complete_file_object(api):
    content = good_jsonl(3)
    f = await api.upload_ok(content, filename="requests.jsonl")
    assert set(f) == FILE_FIELDS
    assert f["object"] == "file"
    assert f["id"].startswith("file-")
    assert f["status"] == "processed"
    assert f["purpose"] == "batch"
    assert f["filename"] == "requests.jsonl"
    assert f["bytes"] == len(content)
    assert isinstance(f["created_at"], int)
    assert f["expires_at"] == f["created_at"] + BATCH_FILE_TTL_S
    assert f["status_details"] is None
    # retrieve gives the same object
    assert (await api.request("GET", f"/v1/files/{f['id']}")).ok() == f


async def test_non_batch_purpose_has_no_default_expiry_and_any_content(api):
    content = b"\x00\x01 not json at all \xff"
    f = await api.upload_ok(content, purpose="user_data", filename="blob.bin")
    assert f["purpose"] == "user_data"
    assert f["expires_at"] is None
    assert f["bytes"] == len(content)
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.status == 200 and resp.body == content


async def test_content_round_trips_byte_for_byte(api):
    content = "\ufeff".encode() + jsonl([line("a"), line("b", temperature=0.5), line("ünïcødé ✓")], eol="\r\n")
    f = await api.upload_ok(content)
    assert f["bytes"] == len(content)
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.status == 200
    assert resp.body == content
    assert int(resp.headers["Content-Length"]) == len(content)


async def test_large_content_round_trips(make_api):
    api = await make_api(max_batch_file_bytes=2 * 1024 * 1024, max_file_bytes=2 * 1024 * 1024)
    content = bytes(range(256)) * 4000  # ~1 MB, spans several storage chunks
    f = await api.upload_ok(content, purpose="user_data")
    assert f["bytes"] == len(content)
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.body == content


@pytest.mark.parametrize("filename", ["my input (1).jsonl", "données-✓.jsonl", "x"])
async def test_filename_is_preserved(api, filename):
    f = await api.upload_ok(good_jsonl(), filename=filename)
    assert f["filename"] == filename
    assert (await api.request("GET", f"/v1/files/{f['id']}")).ok()["filename"] == filename
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.status == 200 and resp.body == good_jsonl()


async def test_file_part_before_purpose_part_works(api):
    content = good_jsonl()
    resp = await api.upload(content, file_first=True)
    f = resp.ok()
    assert f["purpose"] == "batch"
    assert f["bytes"] == len(content)
    assert f["expires_at"] == f["created_at"] + BATCH_FILE_TTL_S


async def test_file_first_still_checks_batch_format(api):
    resp = await api.upload(b"not json\n", file_first=True)
    resp.error(400, param="file")
    assert api.storage.stored_files() == []


async def test_missing_purpose(api):
    resp = await api.upload(good_jsonl(), purpose=None)
    resp.error(400, param="purpose", code="missing_required_parameter")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


@pytest.mark.parametrize("purpose", ["nonsense", "batch_output", "BATCH", "assistants_output", "batch "])
async def test_invalid_purpose(api, purpose):
    resp = await api.upload(good_jsonl(), purpose=purpose)
    resp.error(400, param="purpose", code="invalid_value")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


async def test_empty_purpose(api):
    resp = await api.upload(good_jsonl(), purpose="")
    resp.error(400, param="purpose")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


@pytest.mark.parametrize("purpose", ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"])
async def test_every_upload_purpose_is_accepted(api, purpose):
    f = await api.upload_ok(good_jsonl(), purpose=purpose)
    assert f["purpose"] == purpose


async def test_missing_file_part(api):
    from aiohttp import MultipartWriter

    with MultipartWriter("form-data") as mp:
        for name, value in (("purpose", "batch"), ("expires_after[anchor]", "created_at")):
            part = mp.append(value)
            part.set_content_disposition("form-data", name=name)
    resp = await api.request("POST", "/v1/files", data=mp)
    resp.error(400, param="file", code="missing_required_parameter")
    assert await _listed_ids(api) == []


async def test_unknown_form_field(api):
    resp = await api.upload(good_jsonl(), fields=[("colour", "blue")])
    resp.error(400, param="colour", code="unknown_parameter")
    assert api.storage.stored_files() == []


async def test_two_file_parts_rejected(api):
    from aiohttp import FormData

    form = FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", good_jsonl(), filename="a.jsonl")
    form.add_field("file", good_jsonl(), filename="b.jsonl")
    resp = await api.request("POST", "/v1/files", data=form)
    resp.error(400, param="file")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


@pytest.mark.parametrize(
    "content_type,data",
    [
        ("application/json", json.dumps({"purpose": "batch", "file": "x"}).encode()),
        ("application/x-www-form-urlencoded", b"purpose=batch&file=x"),
        ("text/plain", b"hello"),
    ],
)
async def test_non_multipart_body(api, content_type, data):
    resp = await api.request("POST", "/v1/files", data=data, headers={"Content-Type": content_type})
    resp.error(400)


async def test_multipart_without_body(api):
    resp = await api.request(
        "POST", "/v1/files", data=b"", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert resp.status == 400, resp
    resp.error(400)


async def test_truncated_multipart_body(api):
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"a": 1}\n'
    )
    resp = await api.request(
        "POST", "/v1/files", data=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    resp.error(400)
    assert api.storage.stored_files() == []


@pytest.mark.parametrize(
    "content",
    [
        b"not json\n" + good_jsonl(),
        b"[1, 2, 3]\n" + good_jsonl(),
        b'"a string"\n',
        b"42",
        b'{"unterminated": \n',
        b"\n\n  \nnope\n",
    ],
)
async def test_batch_file_whose_first_line_is_not_a_json_object(api, content):
    resp = await api.upload(content)
    resp.error(400, param="file")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


async def test_batch_file_only_first_line_checked_at_upload(api):
    # Later lines are validated when a batch is created, not at upload.
    f = await api.upload_ok(jsonl([line("a")]) + b"garbage\n")
    assert f["bytes"] == len(jsonl([line("a")])) + len(b"garbage\n")


@pytest.mark.parametrize("content", [b"", b"   ", b"\n\n\n", b" \r\n\t\r\n", "\ufeff".encode(), "\ufeff\n\n".encode()])
async def test_empty_or_blank_batch_file_rejected(api, content):
    resp = await api.upload(content)
    resp.error(400, param="file")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


async def test_bom_and_crlf_batch_file_accepted(api):
    content = "\ufeff".encode() + jsonl([line("a"), line("b")], eol="\r\n")
    f = await api.upload_ok(content)
    assert f["bytes"] == len(content)
    batch = (await api.create_batch(f["id"])).ok()
    done = await api.wait_batch(batch["id"])
    assert done["status"] == "in_progress", done
    assert done["request_counts"]["total"] == 2


async def test_first_line_without_trailing_newline_accepted(api):
    content = json.dumps(line("only")).encode()
    f = await api.upload_ok(content)
    assert f["bytes"] == len(content)


async def test_batch_file_over_limit_is_413_and_nothing_stored(api):
    await api.upload_ok(good_jsonl())  # one file that must survive
    before = await _listed_ids(api)
    stored_before = api.storage.stored_files()
    limit = api.settings.max_batch_file_bytes
    big = jsonl([line("a", padding="x" * (limit + 100))])
    assert len(big) > limit
    resp = await api.upload(big)
    resp.error(413, param="file")
    assert await _listed_ids(api) == before
    assert api.storage.stored_files() == stored_before
    assert api.storage.temp_files() == []


async def test_batch_file_over_limit_with_file_first_is_413_and_nothing_stored(api):
    # Here the size limit of purpose=batch is only known after the file was streamed.
    limit = api.settings.max_batch_file_bytes
    big = jsonl([line("a", padding="x" * (limit + 100))])
    assert limit < len(big) < api.settings.max_file_bytes
    resp = await api.upload(big, file_first=True)
    resp.error(413, param="file")
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []
    assert api.storage.temp_files() == []


async def test_batch_file_exactly_at_limit_accepted(api):
    limit = api.settings.max_batch_file_bytes
    row = json.dumps(line("a")) + "\n"
    pad = limit - len(row.encode())
    content = (row + " " * (pad - 1) + "\n").encode()
    assert len(content) == limit
    f = await api.upload_ok(content)
    assert f["bytes"] == limit


async def test_general_file_limit_applies_to_other_purposes(api):
    limit = api.settings.max_file_bytes
    ok = await api.upload_ok(b"a" * (api.settings.max_batch_file_bytes + 1), purpose="user_data")
    assert ok["bytes"] == api.settings.max_batch_file_bytes + 1
    stored_before = api.storage.stored_files()
    resp = await api.upload(b"a" * (limit + 1), purpose="user_data")
    resp.error(413, param="file")
    assert [f["id"] for f in (await api.list_files()).ok()["data"]] == [ok["id"]]
    assert api.storage.stored_files() == stored_before
    assert api.storage.temp_files() == []


@pytest.mark.parametrize("purpose", ["batch", "user_data"])
async def test_expires_after_valid(api, purpose):
    f = await api.upload_ok(
        good_jsonl(),
        purpose=purpose,
        fields=[("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "3600")],
    )
    assert f["expires_at"] == f["created_at"] + 3600


async def test_expires_after_upper_bound(api):
    f = await api.upload_ok(
        good_jsonl(), fields=[("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "2592000")]
    )
    assert f["expires_at"] == f["created_at"] + 2592000


@pytest.mark.parametrize(
    "fields,param,code",
    [
        (
            [("expires_after[anchor]", "last_active_at"), ("expires_after[seconds]", "3600")],
            "expires_after.anchor",
            "invalid_value",
        ),
        ([("expires_after[seconds]", "3600")], "expires_after.anchor", "invalid_value"),
        ([("expires_after[anchor]", "created_at")], "expires_after.seconds", "invalid_type"),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "abc")],
            "expires_after.seconds",
            "invalid_type",
        ),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "3599")],
            "expires_after.seconds",
            "invalid_value",
        ),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "2592001")],
            "expires_after.seconds",
            "invalid_value",
        ),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "-3600")],
            "expires_after.seconds",
            "invalid_value",
        ),
    ],
)
async def test_expires_after_invalid(api, fields, param, code):
    resp = await api.upload(good_jsonl(), fields=fields)
    resp.error(400, param=param, code=code)
    assert await _listed_ids(api) == []
    assert api.storage.stored_files() == []


async def test_bytes_equals_uploaded_size_and_listing_agrees(api):
    sizes = []
    for n in (1, 2, 3):
        content = good_jsonl(n)
        f = await api.upload_ok(content)
        assert f["bytes"] == len(content)
        sizes.append((f["id"], len(content)))
    listed = {f["id"]: f["bytes"] for f in (await api.list_files()).ok()["data"]}
    assert listed == dict(sizes)


async def test_sdk_encoded_multipart_is_accepted(api):
    """The exact multipart body the openai SDK (httpx2) produces for files.create(..., expires_after=...)."""
    import httpx2

    content = good_jsonl(2)
    req = httpx2.Request(
        "POST",
        "http://sluice/v1/files",
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "7200"},
        files={"file": ("batch input ✓.jsonl", content, "application/octet-stream")},
    )
    resp = await api.request(
        "POST", "/v1/files", data=req.read(), headers={"Content-Type": req.headers["content-type"]}
    )
    f = resp.ok()
    assert f["filename"] == "batch input ✓.jsonl"
    assert f["bytes"] == len(content)
    assert f["expires_at"] == f["created_at"] + 7200
    assert (await api.request("GET", f"/v1/files/{f['id']}/content")).body == content


_PURPOSE_PART = b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'


@pytest.mark.parametrize(
    "content_type,body,param",
    [
        ("multipart/form-data", b"--x\r\n\r\n", None),  # no boundary parameter
        ("multipart/form-data; boundary=x", b"garbage", None),
        ("multipart/form-data; boundary=x", b"--x--\r\n", "purpose"),  # no parts at all
        ("multipart/form-data; boundary=x", _PURPOSE_PART + b"\xff\xfe\r\n--x--\r\n", "purpose"),  # not UTF-8
        ("multipart/form-data; boundary=x", _PURPOSE_PART + b"a" * 5000 + b"\r\n--x--\r\n", "purpose"),  # huge field
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Type: multipart/mixed; boundary=y\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
            b"--y\r\n\r\nabc\r\n--y--\r\n--x--\r\n",
            None,
        ),  # nested multipart
    ],
)
async def test_malformed_multipart_is_400(api, content_type, body, param):
    resp = await api.request("POST", "/v1/files", data=body, headers={"Content-Type": content_type})
    resp.error(400, param=param)
    assert api.storage.stored_files() == []
    assert api.storage.temp_files() == []
