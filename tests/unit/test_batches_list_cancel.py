"""GET /v1/batches, token isolation, and POST /v1/batches/{id}/cancel."""

from __future__ import annotations

import pytest
from yarl import URL

from .conftest import NO_AUTH, TOKEN_B, good_jsonl, jsonl, line, poll

UNKNOWN_BATCH = "batch_0000000fffff0123456789ab"


async def _ids(api, token="tok-a", **params) -> tuple[list[str], dict]:
    page = (await api.request("GET", "/v1/batches", token=token, params=params)).ok()
    return [b["id"] for b in page["data"]], page


async def _create_n(api, n: int) -> list[str]:
    f = await api.upload_ok()
    return [(await api.create_batch(f["id"])).ok()["id"] for _ in range(n)]


async def test_empty_list(api):
    _, page = await _ids(api)
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


async def test_newest_first_with_full_objects(api):
    created = await _create_n(api, 3)
    for batch_id in created:  # settle, so that the list and retrieve see the same state
        await api.wait_batch(batch_id)
    ids, page = await _ids(api)
    assert ids == created[::-1]
    assert page["first_id"] == created[-1] and page["last_id"] == created[0]
    assert page["has_more"] is False
    for b in page["data"]:
        assert b["object"] == "batch" and b == await api.get_batch(b["id"])


async def test_default_limit_is_20(api):
    created = await _create_n(api, 21)
    ids, page = await _ids(api)
    assert ids == created[::-1][:20]
    assert page["has_more"] is True


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "2.0"])
async def test_limit_out_of_bounds(api, limit):
    await _create_n(api, 1)
    (await api.request("GET", "/v1/batches", params={"limit": limit})).error(400, param="limit")


@pytest.mark.parametrize("limit", ["1", "100"])
async def test_limit_bounds_accepted(api, limit):
    created = await _create_n(api, 2)
    ids, page = await _ids(api, limit=limit)
    assert ids == created[::-1][: int(limit)]
    assert page["has_more"] is (int(limit) < 2)


async def test_after_pagination(api):
    created = await _create_n(api, 5)
    expected = created[::-1]
    seen, pages, after = [], [], None
    for _ in range(10):
        params = {"limit": 2, **({"after": after} if after else {})}
        ids, page = await _ids(api, **params)
        pages.append(page)
        seen += ids
        if not page["has_more"]:
            break
        after = ids[-1]
    assert seen == expected
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert all(p["first_id"] == p["data"][0]["id"] and p["last_id"] == p["data"][-1]["id"] for p in pages)


async def test_after_the_last_batch_is_empty(api):
    created = await _create_n(api, 2)
    ids, page = await _ids(api, after=created[0])
    assert ids == [] and page["has_more"] is False


@pytest.mark.parametrize("after", ["../etc", "file-000000000001aaaaaaaaaaaa", "batch_x", "batch_" + "0" * 30])
async def test_garbage_after_is_400(api, after):
    await _create_n(api, 1)
    (await api.request("GET", "/v1/batches", params={"after": after})).error(400, param="after")


async def test_token_isolation(api):
    created = await _create_n(api, 2)
    f_b = await api.upload_ok(token=TOKEN_B)
    b_only = (await api.create_batch(f_b["id"], token=TOKEN_B)).ok()["id"]
    ids_a, _ = await _ids(api)
    ids_b, _ = await _ids(api, token=TOKEN_B)
    assert ids_a == created[::-1]
    assert ids_b == [b_only]
    for batch_id in created:
        (await api.request("GET", f"/v1/batches/{batch_id}", token=TOKEN_B)).error(404)
        (await api.cancel(batch_id, token=TOKEN_B)).error(404)
    (await api.request("GET", f"/v1/batches/{b_only}")).error(404)
    (await api.cancel(b_only)).error(404)
    # A's batches were not touched by B's cancel attempts.
    for batch_id in created:
        b = await api.wait_batch(batch_id)
        assert b["status"] == "in_progress" and b["cancelling_at"] is None
    # B's batch id as an `after` cursor for A reveals nothing about B.
    ids, _ = await _ids(api, after=b_only)
    assert set(ids) <= set(created)


@pytest.mark.parametrize("raw", [UNKNOWN_BATCH, "batch_nope", "..%2F..%2Fetc", "file-000000000001aaaaaaaaaaaa"])
async def test_unknown_batch_is_404(api, raw):
    (await api.request("GET", URL(f"/v1/batches/{raw}", encoded=True))).error(404)
    (await api.request("POST", URL(f"/v1/batches/{raw}/cancel", encoded=True))).error(404)


async def test_cancel_in_progress_batch(api):
    batch = await api.run_batch(good_jsonl(2))
    assert batch["status"] == "in_progress"
    resp = await api.cancel(batch["id"])
    b = resp.ok()
    assert b["status"] == "cancelling"
    assert isinstance(b["cancelling_at"], int) and b["cancelling_at"] >= batch["in_progress_at"]
    assert b["cancelled_at"] is None
    assert b["request_counts"]["total"] == 2
    assert await api.get_batch(batch["id"]) == b
    # cancelling again is fine and changes nothing
    again = (await api.cancel(batch["id"])).ok()
    assert again["status"] == "cancelling"
    assert again["cancelling_at"] == b["cancelling_at"]


async def test_cancel_like_the_sdk_no_body_json_content_type(api):
    batch = await api.run_batch(good_jsonl(1))
    resp = await api.cancel(batch["id"], data=b"", headers={"Content-Type": "application/json", "Content-Length": "0"})
    assert resp.ok()["status"] == "cancelling"


async def test_cancel_ignores_any_body(api):
    batch = await api.run_batch(good_jsonl(1))
    resp = await api.cancel(batch["id"], data=b"{garbage", headers={"Content-Type": "application/json"})
    assert resp.ok()["status"] == "cancelling"


async def test_cancel_failed_batch_is_409_without_retry(api):
    batch = await api.run_batch(jsonl([line("a"), "broken"]))
    assert batch["status"] == "failed"
    resp = await api.cancel(batch["id"])
    err = resp.error(409, param=None, code=None)
    assert "failed" in err["message"]
    assert resp.headers.get("x-should-retry") == "false"
    after = await api.get_batch(batch["id"])
    assert after["status"] == "failed" and after["cancelling_at"] is None


async def test_cancel_unknown_is_404(api):
    resp = await api.cancel(UNKNOWN_BATCH)
    resp.error(404)


async def test_cancel_requires_auth(api):
    batch = await api.run_batch(good_jsonl(1))
    (await api.cancel(batch["id"], token=NO_AUTH)).error(401, code="invalid_api_key")
    assert (await api.get_batch(batch["id"]))["status"] == "in_progress"


async def test_batch_cancelled_while_validating_ends_cancelled(api):
    f = await api.upload_ok(good_jsonl(2))
    api.storage.hold()  # the publisher blocks while reading the input file
    created = (await api.create_batch(f["id"])).ok()
    await poll(_set(api.storage.reading), message="publisher to start validating")
    resp = await api.cancel(created["id"])
    b = resp.ok()
    assert b["status"] == "cancelling"
    assert isinstance(b["cancelling_at"], int)
    api.storage.release()
    done = await api.wait_batch(created["id"], leave="cancelling")
    assert done["status"] == "cancelled", done
    assert isinstance(done["cancelled_at"], int) and done["cancelled_at"] >= done["cancelling_at"]
    assert done["in_progress_at"] is None and done["failed_at"] is None
    assert done["errors"] is None
    # cancelling a cancelled batch is still a 200, not a 409
    assert (await api.cancel(created["id"])).ok()["status"] == "cancelled"


async def test_invalid_batch_cancelled_while_validating_ends_cancelled(api):
    f = await api.upload_ok(jsonl([line("a"), "broken"]))
    api.storage.hold()
    created = (await api.create_batch(f["id"])).ok()
    await poll(_set(api.storage.reading), message="publisher to start validating")
    assert (await api.cancel(created["id"])).ok()["status"] == "cancelling"
    api.storage.release()
    done = await api.wait_batch(created["id"], leave="cancelling")
    assert done["status"] == "cancelled", done
    assert done["failed_at"] is None


async def test_batch_cancelled_before_the_publisher_claims_it(api):
    f = await api.upload_ok(good_jsonl(2))
    api.storage.hold()
    first = (await api.create_batch(f["id"])).ok()  # occupies the publisher
    await poll(_set(api.storage.reading), message="publisher to start validating")
    second = (await api.create_batch(f["id"])).ok()  # waits in the queue
    assert (await api.cancel(second["id"])).ok()["status"] == "cancelling"
    api.storage.release()
    done_first = await api.wait_batch(first["id"])
    assert done_first["status"] == "in_progress"
    done_second = await api.wait_batch(second["id"], leave="cancelling")
    assert done_second["status"] == "cancelled", done_second
    assert done_second["in_progress_at"] is None
    assert done_second["request_counts"]["total"] == 0


def _set(event):
    async def check():
        return event.is_set()

    return check
