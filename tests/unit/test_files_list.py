"""GET /v1/files (filters, order, limits, cursor pagination), retrieve, delete and id handling."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from .conftest import TOKEN_B, good_jsonl

UNKNOWN_FILE = "file-0000000fffff0123456789ab"


async def _upload_n(api, n: int, purpose: str = "batch") -> list[dict]:
    return [await api.upload_ok(good_jsonl(), purpose=purpose, filename=f"f{i}.jsonl") for i in range(n)]


def _ids(page: dict) -> list[str]:
    return [f["id"] for f in page["data"]]


async def test_empty_list_shape(api):
    page = (await api.list_files()).ok()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


async def test_default_order_is_newest_first_and_asc_reverses(api):
    files = await _upload_n(api, 4)
    created = [f["id"] for f in files]
    desc = (await api.list_files()).ok()
    assert _ids(desc) == created[::-1]
    assert desc["first_id"] == created[-1] and desc["last_id"] == created[0]
    assert desc["has_more"] is False
    assert (await api.list_files(order="desc")).ok()["data"] == desc["data"]
    asc = (await api.list_files(order="asc")).ok()
    assert _ids(asc) == created
    assert asc["first_id"] == created[0] and asc["last_id"] == created[-1]
    # list entries are full file objects, equal to what upload returned
    assert asc["data"] == files


@pytest.mark.parametrize("order", ["ASC", "up", "1", ""])
async def test_invalid_order(api, order):
    (await api.list_files(order=order)).error(400, param="order")


async def test_purpose_filter(api):
    batch_files = await _upload_n(api, 2, "batch")
    user_files = await _upload_n(api, 3, "user_data")
    batch_ids = [f["id"] for f in batch_files]
    user_ids = [f["id"] for f in user_files]
    assert _ids((await api.list_files(purpose="batch", order="asc")).ok()) == batch_ids
    assert _ids((await api.list_files(purpose="user_data", order="asc")).ok()) == user_ids
    assert _ids((await api.list_files(purpose="vision")).ok()) == []
    assert _ids((await api.list_files(order="asc")).ok()) == batch_ids + user_ids


async def test_purpose_filter_paginates_within_purpose(api):
    b1 = await api.upload_ok(good_jsonl())
    await api.upload_ok(good_jsonl(), purpose="user_data")
    b2 = await api.upload_ok(good_jsonl())
    await api.upload_ok(good_jsonl(), purpose="user_data")
    p1 = (await api.list_files(purpose="batch", limit=1, order="asc")).ok()
    assert _ids(p1) == [b1["id"]] and p1["has_more"] is True
    p2 = (await api.list_files(purpose="batch", limit=1, order="asc", after=b1["id"])).ok()
    assert _ids(p2) == [b2["id"]] and p2["has_more"] is False


async def test_invalid_purpose_filter(api):
    (await api.list_files(purpose="bogus")).error(400, param="purpose")


@pytest.mark.parametrize("limit", ["0", "10001", "abc", "-1", "1.5", "", " "])
async def test_limit_out_of_bounds(api, limit):
    await api.upload_ok()
    if limit == "":
        # An empty limit is the same as no limit at all, or a 400; never a 500.
        resp = await api.list_files(limit=limit)
        assert resp.status in (200, 400), resp
        if resp.status == 400:
            resp.error(400, param="limit")
        return
    (await api.list_files(limit=limit)).error(400, param="limit")


@pytest.mark.parametrize("limit", ["1", "10000"])
async def test_limit_bounds_accepted(api, limit):
    await _upload_n(api, 2)
    page = (await api.list_files(limit=limit)).ok()
    assert len(page["data"]) == min(int(limit), 2)
    assert page["has_more"] is (int(limit) < 2)


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_after_pagination_walks_everything_once(api, order):
    files = await _upload_n(api, 5)
    expected = [f["id"] for f in files]
    if order == "desc":
        expected.reverse()
    seen: list[str] = []
    pages = []
    after = None
    for _ in range(10):
        params = {"limit": 2, "order": order}
        if after:
            params["after"] = after
        page = (await api.list_files(**params)).ok()
        pages.append(page)
        seen += _ids(page)
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == expected
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert [p["has_more"] for p in pages] == [True, True, False]


async def test_has_more_false_on_exact_fit(api):
    files = await _upload_n(api, 2)
    page = (await api.list_files(limit=2)).ok()
    assert len(page["data"]) == 2 and page["has_more"] is False
    after_last = (await api.list_files(limit=2, after=files[0]["id"])).ok()
    assert after_last == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


async def test_deleted_id_still_works_as_cursor(api):
    f1, f2, f3 = await _upload_n(api, 3)
    deleted = (await api.request("DELETE", f"/v1/files/{f2['id']}")).ok()
    assert deleted == {"id": f2["id"], "object": "file", "deleted": True}
    asc = (await api.list_files(order="asc", after=f2["id"])).ok()
    assert _ids(asc) == [f3["id"]]
    desc = (await api.list_files(after=f2["id"])).ok()
    assert _ids(desc) == [f1["id"]]


async def test_unknown_but_well_formed_cursor(api):
    # A well-formed id that never existed is a valid position, not an error.
    await _upload_n(api, 2)
    resp = await api.list_files(after="file-ffffffffffff0123456789ab")
    assert len(resp.ok()["data"]) == 2


@pytest.mark.parametrize(
    "after",
    [
        "../etc",
        "../../etc/passwd",
        "file-x",
        "batch_000000000001aaaaaaaaaaaa",
        "file-000000000001aaaaaaaaaaaa/../x",
        "%00",
        "file-" + "0" * 200,
    ],
)
async def test_garbage_after_is_400(api, after):
    await _upload_n(api, 1)
    (await api.list_files(after=after)).error(400, param="after")


async def test_delete_then_retrieve_content_and_delete_are_404(api):
    f = await api.upload_ok()
    keep = await api.upload_ok()
    resp = await api.request("DELETE", f"/v1/files/{f['id']}")
    assert resp.ok() == {"id": f["id"], "object": "file", "deleted": True}
    (await api.request("GET", f"/v1/files/{f['id']}")).error(404)
    (await api.request("GET", f"/v1/files/{f['id']}/content")).error(404)
    (await api.request("DELETE", f"/v1/files/{f['id']}")).error(404)
    assert _ids((await api.list_files()).ok()) == [keep["id"]]
    assert _ids((await api.list_files(purpose="batch")).ok()) == [keep["id"]]
    # the content is gone from storage too (no batch uses it)
    assert api.storage.stored_files() == [keep["id"]]


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/content"), ("DELETE", "")])
async def test_unknown_file_is_404(api, method, suffix):
    resp = await api.request(method, f"/v1/files/{UNKNOWN_FILE}{suffix}")
    resp.error(404)


@pytest.mark.parametrize(
    "raw",
    [
        "..%2F..%2Fetc",
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E",
        "file-..%2F..%2Fx",
        "file-000000000001aaaaaaaaaaaa%2F..",
        "..",
        "%00",
        "file-%0Ax",
    ],
)
@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/content"), ("DELETE", "")])
async def test_path_characters_in_file_id_are_404(api, raw, method, suffix):
    await api.upload_ok()
    resp = await api.request(method, URL(f"/v1/files/{raw}{suffix}", encoded=True))
    resp.error(404)


async def test_other_tokens_files_are_invisible(api):
    f = await api.upload_ok()
    assert _ids((await api.list_files(token=TOKEN_B)).ok()) == []
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        (await api.request(method, f"/v1/files/{f['id']}{suffix}", token=TOKEN_B)).error(404)
    # still there for its owner
    assert (await api.request("GET", f"/v1/files/{f['id']}")).ok() == f
    assert (await api.request("GET", f"/v1/files/{f['id']}/content")).body == good_jsonl()


async def test_content_type_of_content(api):
    f = await api.upload_ok()
    resp = await api.request("GET", f"/v1/files/{f['id']}/content")
    assert resp.status == 200
    assert resp.content_type in ("application/octet-stream", "application/jsonl", "application/x-ndjson")


async def test_deleting_an_input_file_keeps_content_for_its_running_batch(api):
    f = await api.upload_ok(good_jsonl(2))
    batch = await api.run_batch(good_jsonl(2))  # a second file, for contrast
    b = (await api.create_batch(f["id"])).ok()
    assert (await api.wait_batch(b["id"]))["status"] == "in_progress"
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True
    # Gone for the API...
    (await api.request("GET", f"/v1/files/{f['id']}")).error(404)
    (await api.request("GET", f"/v1/files/{f['id']}/content")).error(404)
    assert f["id"] not in [x["id"] for x in (await api.list_files()).ok()["data"]]
    # ...but the running batch still has its input content.
    assert len(api.storage.stored_files()) == 2
    assert (await api.get_batch(b["id"]))["input_file_id"] == f["id"]
    assert batch["status"] == "in_progress"


async def test_deleting_an_input_file_of_a_failed_batch_removes_content(api):
    f = await api.upload_ok(b'{"custom_id": "a"}\n')
    b = (await api.create_batch(f["id"])).ok()
    assert (await api.wait_batch(b["id"]))["status"] == "failed"
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True
    assert api.storage.stored_files() == []


async def test_content_of_file_deleted_during_validation_goes_when_the_batch_is_cancelled(api):
    from .conftest import poll

    f = await api.upload_ok(good_jsonl(2))
    api.storage.hold()
    b = (await api.create_batch(f["id"])).ok()

    async def reading():
        return api.storage.reading.is_set()

    await poll(reading, message="publisher to start validating")
    assert (await api.request("DELETE", f"/v1/files/{f['id']}")).ok()["deleted"] is True
    assert len(api.storage.stored_files()) == 1  # still needed by the validating batch
    assert (await api.cancel(b["id"])).ok()["status"] == "cancelling"
    api.storage.release()
    assert (await api.wait_batch(b["id"], leave="cancelling"))["status"] == "cancelled"
    # The publisher releases the content right after it records the end state: wait for it.
    await poll(lambda: asyncio.sleep(0, api.storage.stored_files() == []), message="the deleted file's content to go")
