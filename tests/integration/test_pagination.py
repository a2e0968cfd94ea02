"""Cursor pagination of files and batches, driven the way the SDK does it.

Own stack: the lists then hold exactly the objects this module created.
"""

from __future__ import annotations

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N_BATCHES = 22  # more than the default batch page size (20)


def collect(page, bound: int) -> list:
    """Auto-paginate ``page``; fail instead of looping forever when the server never stops."""
    items = []
    for item in page:
        items.append(item)
        assert len(items) <= bound, f"pagination did not stop after {bound} items: server ignores 'after'/'has_more'?"
    return items


@pytest.fixture(scope="module")
def pstack(module_stack_factory):
    return module_stack_factory.start(name="pagination")


@pytest.fixture(scope="module")
def objects(pstack):
    """Uploads 4 batch files and 2 user_data files, then runs N_BATCHES one-line batches to completion."""
    client = pstack.client()
    batch_files = [
        pstack.upload_jsonl([pstack.chat_line(f"p{i}", f"page {i}")], client=client, filename=f"in{i}.jsonl")
        for i in range(4)
    ]
    user_files = [
        pstack.upload_jsonl([{"k": i}], client=client, purpose="user_data", filename=f"data{i}.jsonl") for i in range(2)
    ]
    batches = [pstack.create_batch(batch_files[i % 4].id, client=client).id for i in range(N_BATCHES)]
    finished = [pstack.wait_for_batch(b, client=client) for b in batches]
    assert all(b.status == "completed" for b in finished), [b.status for b in finished]
    output_files = [b.output_file_id for b in finished]
    assert all(output_files) and len(set(output_files)) == N_BATCHES
    return {
        "batch": [f.id for f in batch_files],
        "user_data": [f.id for f in user_files],
        "batch_output": output_files,
        "batches": batches,  # in creation order
    }


def test_batches_auto_pagination_limit_1(pstack, objects):
    client = pstack.client()
    items = collect(client.batches.list(limit=1), bound=N_BATCHES + 5)
    ids = [b.id for b in items]
    assert len(ids) == len(set(ids)), "duplicates across pages"
    assert ids == list(reversed(objects["batches"])), "batches must be listed newest first, completely"


def test_batches_pages_and_has_more(pstack, objects):
    client = pstack.client()
    newest_first = list(reversed(objects["batches"]))

    default = client.batches.list()
    assert len(default.data) == 20, "default batch page size is 20"
    assert default.has_more is True

    page = client.batches.list(limit=N_BATCHES)
    assert [b.id for b in page.data] == newest_first
    assert page.has_more is False

    page = client.batches.list(limit=N_BATCHES - 1)
    assert page.has_more is True

    page = client.batches.list(limit=100)
    assert len(page.data) == N_BATCHES and page.has_more is False

    # Manual walk, page by page.
    walked, page, pages = [], client.batches.list(limit=5), 0
    while True:
        pages += 1
        walked += [b.id for b in page.data]
        assert pages <= 10
        if not page.has_more:
            break
        assert len(page.data) == 5
        page = client.batches.list(limit=5, after=page.data[-1].id)
    assert walked == newest_first
    assert pages == 5

    # 'after' the oldest batch: an empty last page.
    last = client.batches.list(after=newest_first[-1])
    assert last.data == [] and last.has_more is False

    raw = pstack.http("GET", f"/v1/batches?limit=2&after={newest_first[1]}").json()
    assert [b["id"] for b in raw["data"]] == newest_first[2:4]
    assert raw["object"] == "list" and raw["has_more"] is True
    # first_id/last_id are optional for batches, but must be right when sent.
    assert raw.get("first_id", newest_first[2]) == newest_first[2]
    assert raw.get("last_id", newest_first[3]) == newest_first[3]


@pytest.mark.parametrize("limit", [0, -1, 101, "abc"])
def test_batches_limit_out_of_range_is_400(pstack, objects, limit):
    pstack.assert_error(pstack.http("GET", f"/v1/batches?limit={limit}"), 400)


def test_files_auto_pagination_and_order(pstack, objects):
    client = pstack.client()
    everything = objects["batch"] + objects["user_data"] + objects["batch_output"]
    bound = len(everything) + 5

    desc = [f.id for f in collect(client.files.list(limit=1), bound)]
    assert len(desc) == len(set(desc)), "duplicates across pages"
    assert set(desc) == set(everything)

    desc_explicit = [f.id for f in collect(client.files.list(limit=1, order="desc"), bound)]
    asc = [f.id for f in collect(client.files.list(limit=1, order="asc"), bound)]
    assert desc_explicit == desc
    assert asc == list(reversed(desc))

    uploads = objects["batch"] + objects["user_data"]  # uploaded in this order, before any output
    assert [i for i in asc if i in uploads] == uploads

    page = client.files.list(limit=len(everything))
    assert page.has_more is False and len(page.data) == len(everything)
    page = client.files.list(limit=len(everything) - 1)
    assert page.has_more is True
    page = client.files.list()  # default limit 10000
    assert page.has_more is False and {f.id for f in page.data} == set(everything)

    raw = pstack.http("GET", f"/v1/files?limit=3&order=asc&after={asc[0]}").json()
    assert [f["id"] for f in raw["data"]] == asc[1:4]
    assert raw["has_more"] is True


@pytest.mark.parametrize("purpose", ["batch", "user_data", "batch_output"])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_files_purpose_filter(pstack, objects, purpose, order):
    client = pstack.client()
    expected = objects[purpose]
    items = collect(client.files.list(limit=1, purpose=purpose, order=order), len(expected) + 5)
    assert all(f.purpose == purpose for f in items)
    ids = [f.id for f in items]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(expected)
    if purpose != "batch_output":  # outputs are written by the finalizer in no defined order
        assert ids == (expected if order == "asc" else list(reversed(expected)))


def test_files_purpose_filter_with_no_match(pstack, objects):
    page = pstack.client().files.list(purpose="vision")
    assert page.data == [] and page.has_more is False


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "order=sideways"])
def test_files_bad_list_params_are_400(pstack, objects, query):
    pstack.assert_error(pstack.http("GET", f"/v1/files?{query}"), 400)


def test_list_with_unknown_after_cursor(pstack, objects):
    client = pstack.client()
    for call in (lambda: client.batches.list(after="batch_unknown"), lambda: client.files.list(after="file-unknown")):
        try:
            page = call()
        except openai.APIStatusError as exc:  # rejecting the cursor is fine, as long as it is not a 5xx
            assert 400 <= exc.status_code < 500, exc
            pstack.assert_error(exc)
        else:
            assert page.has_more is not None
