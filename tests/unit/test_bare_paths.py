"""The API also answers on bare paths (/files, /batches), sharing state with /v1/..."""

from __future__ import annotations

from .conftest import NO_AUTH, good_jsonl


async def test_bare_file_routes(api):
    content = good_jsonl(2)
    f = (await api.upload(content, prefix="")).ok()
    assert f["object"] == "file" and f["bytes"] == len(content)
    assert (await api.request("GET", f"/files/{f['id']}")).ok() == f
    assert (await api.request("GET", f"/v1/files/{f['id']}")).ok() == f
    assert (await api.request("GET", f"/files/{f['id']}/content")).body == content
    page = (await api.request("GET", "/files", params={"purpose": "batch"})).ok()
    assert [x["id"] for x in page["data"]] == [f["id"]]
    assert page == (await api.request("GET", "/v1/files", params={"purpose": "batch"})).ok()
    assert (await api.request("DELETE", f"/files/{f['id']}")).ok() == {"id": f["id"], "object": "file", "deleted": True}
    (await api.request("GET", f"/v1/files/{f['id']}")).error(404)
    (await api.request("GET", f"/files/{f['id']}")).error(404)


async def test_bare_batch_routes(api):
    f = await api.upload_ok()
    b = (await api.create_batch(f["id"], prefix="")).ok()
    assert b["object"] == "batch" and b["status"] == "validating"
    done = await api.wait_batch(b["id"])
    assert done["status"] == "in_progress"
    assert (await api.request("GET", f"/batches/{b['id']}")).ok() == done
    page = (await api.request("GET", "/batches")).ok()
    assert [x["id"] for x in page["data"]] == [b["id"]]
    cancelled = (await api.request("POST", f"/batches/{b['id']}/cancel")).ok()
    assert cancelled["status"] == "cancelling"
    assert (await api.get_batch(b["id"]))["status"] == "cancelling"


async def test_bare_paths_validate_and_authenticate_the_same(api):
    (await api.request("GET", "/files", token=NO_AUTH)).error(401, code="invalid_api_key")
    (await api.request("POST", "/batches", token=NO_AUTH, json={})).error(401, code="invalid_api_key")
    (await api.upload(good_jsonl(), purpose="nope", prefix="")).error(400, param="purpose", code="invalid_value")
    (await api.create_batch("file-0000000fffff0123456789ab", prefix="")).error(404, param="input_file_id")
    (await api.request("POST", "/batches", json={"endpoint": "/v1/chat/completions"})).error(
        400, param="input_file_id", code="missing_required_parameter"
    )
    (await api.request("GET", "/batches", params={"limit": "0"})).error(400, param="limit")
    (await api.request("GET", "/files", params={"limit": "10001"})).error(400, param="limit")
    (await api.request("PUT", "/batches")).error(405)
