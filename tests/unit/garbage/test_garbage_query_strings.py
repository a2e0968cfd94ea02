"""Garbage query strings on the list endpoints (``GET /v1/files``, ``GET /v1/batches``).

See ``harness.py`` for the guarantee under test and how an example runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from yarl import URL

from .harness import (
    COMMON_SETTINGS,
    FILE_PURPOSES,
    GOOD_BATCH,
    GOOD_FILE,
    ID_RE,
    OTHER_FILE,
    TEXT,
    Harness,
    assert_client_error,
)

# --------------------------------------------------------------------------------------------
# 4. Query parameters of the list endpoints


@dataclass(frozen=True)
class RawValue:
    """A query value sent as percent-encoded raw bytes (may be invalid UTF-8)."""

    data: bytes


limit_values = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(-5, 120).map(str),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1",
            "2",
            "100",
            "101",
            "10000",
            "10001",
            "1e3",
            "0x10",
            " 5",
            "5 ",
            "+5",
            "1_0",
            "٣",
            "9" * 5000,
            "NaN",
            "inf",
            "\x00",
            "1.5",
            "١٠",
        ]
    ),
    st.text(TEXT, max_size=12),
    st.binary(max_size=8).map(RawValue),
)
after_values = st.one_of(
    st.sampled_from(
        [
            "",
            GOOD_FILE,
            OTHER_FILE,
            GOOD_BATCH,
            "file-" + "0" * 24,
            "batch_" + "f" * 24,
            "file-",
            "../x",
            "%00",
            "file-" + "0" * 23 + "g",
        ]
    ),
    st.from_regex(r"\A(file-|batch_)[0-9a-f]{24}\Z"),
    st.text(TEXT, max_size=40),
    st.binary(max_size=8).map(RawValue),
)
order_values = st.sampled_from(["asc", "desc", "", "ASC", "random", "asc;desc"]) | st.text(TEXT, max_size=10)
purpose_values = st.sampled_from(FILE_PURPOSES + ("", "BATCH", "nope")) | st.text(TEXT, max_size=12)


@st.composite
def list_queries(draw) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(["/v1/files", "/v1/batches"]))
    q: dict[str, Any] = {}
    if draw(st.booleans()):
        q["limit"] = draw(limit_values)
    if draw(st.booleans()):
        q["after"] = draw(after_values)
    if draw(st.booleans()):
        q["order"] = draw(order_values)
    if draw(st.booleans()):
        q["purpose"] = draw(purpose_values)
    for k, v in draw(
        st.dictionaries(st.text(TEXT, min_size=1, max_size=10), st.text(TEXT, max_size=10), max_size=2)
    ).items():
        q.setdefault(k, v)
    return path, q


def _encode_query(q: dict[str, Any]) -> str:
    out = []
    for k, v in q.items():
        value = "".join(f"%{b:02X}" for b in v.data) if isinstance(v, RawValue) else quote(v, safe="")
        out.append(f"{quote(k, safe='')}={value}")
    return "&".join(out)


async def _seed_lists(h: Harness) -> None:
    """A few more files (several purposes) and batches, so that pages and cursors have something to cut."""
    if getattr(h, "lists_seeded", False):
        return
    for purpose in ("user_data", "batch", "vision", "batch", "assistants"):
        (await h.api.upload(h.good_content, purpose=purpose, filename=f"list-{purpose}.jsonl")).ok()
    for _ in range(4):
        await h.wait_validated((await h.api.create_batch(h.good_file["id"])).ok()["id"])
    h.lists_seeded = True


@settings(max_examples=100, **COMMON_SETTINGS)
@given(query=list_queries())
@example(query=("/v1/files", {"limit": "9" * 5000}))
@example(query=("/v1/files", {"limit": "-1"}))
@example(query=("/v1/batches", {"limit": "abc"}))
@example(query=("/v1/files", {"limit": RawValue(b"\xff\xfe")}))
@example(query=("/v1/files", {"after": "../../etc/passwd", "order": "sideways", "purpose": "x" * 3000}))
@example(query=("/v1/batches", {"after": GOOD_BATCH, "limit": "1"}))
@example(query=("/v1/files", {"after": GOOD_FILE, "order": "asc", "limit": "1"}))
@example(query=("/v1/files", {"after": GOOD_FILE, "order": "desc", "limit": "2", "purpose": "batch"}))
def test_list_query_garbage(h, query):
    """GET /v1/files and /v1/batches: a correct page for the parameters, or a 400 naming a bad one."""
    path, raw_q = query
    q = {k: h.resolve(v) for k, v in raw_q.items()}
    is_files = path == "/v1/files"
    prefix, hi = ("file-", 10000) if is_files else ("batch_", 100)
    known = {"limit", "after", "order", "purpose"} if is_files else {"limit", "after"}
    invalid: set[str] = set()  # surely invalid: must be refused
    unsure: set[str] = set()  # a 400 naming it, or a correct page ignoring it, are both fine
    texts = {k: v.data.decode("utf-8", "replace") if isinstance(v, RawValue) else v for k, v in q.items()}
    for k, text in texts.items():
        if k not in known:
            unsure.add(k)
        elif k == "limit":
            if re.fullmatch(r"[0-9]{1,7}", text) and 1 <= int(text) <= hi:
                continue
            if re.fullmatch(r"-?[0-9]+", text) or (text and not any(ch.isdigit() for ch in text)):
                invalid.add(k)
            else:
                unsure.add(k)
        elif k == "after":
            if not (text == "" or (ID_RE.match(text) and text.startswith(prefix))):
                unsure.add(k)
        elif k == "order":
            if text not in ("asc", "desc"):
                unsure.add(k)
        elif k == "purpose":
            if text not in FILE_PURPOSES + ("",):
                unsure.add(k)
    note(f"invalid={invalid} unsure={unsure}")

    async def body():
        await _seed_lists(h)
        url = URL(f"{path}?{_encode_query(q)}", encoded=True)
        resp = await h.api.request("GET", url)
        if resp.status != 200:
            assert invalid or unsure, f"valid list parameters were refused: {resp.body[:300]!r}"
            assert_client_error(resp, {400}, params=invalid | unsure)
            return
        assert not invalid, f"invalid parameters {invalid} were accepted: {resp.body[:300]!r}"
        page = resp.json()
        assert set(page) == {"object", "data", "has_more", "first_id", "last_id"}, page
        assert page["object"] == "list" and isinstance(page["has_more"], bool)
        data = page["data"]
        assert page["first_id"] == (data[0]["id"] if data else None)
        assert page["last_id"] == (data[-1]["id"] if data else None)
        assert all(x["id"].startswith(prefix) for x in data), data
        if "limit" in texts and "limit" not in unsure:
            assert len(data) <= int(texts["limit"])
        everything = (await h.api.request("GET", path, params={"limit": str(hi)})).ok()["data"]
        assert all(x in everything for x in data), "a listed object differs from the full listing"
        if unsure & {"after", "limit", "order", "purpose"}:
            return  # leniency on a doubtful parameter: the page only has to be made of real objects
        # The whole listing for the same filter and order is the reference for the page.
        full_q = {k: texts[k] for k in ("order", "purpose") if texts.get(k)}
        full = (await h.api.request("GET", path, params={**full_q, "limit": str(hi)})).ok()["data"]
        if full_q.get("purpose"):
            assert all(x["purpose"] == full_q["purpose"] for x in full)
        created = [x["created_at"] for x in full]
        assert created == sorted(created, reverse=full_q.get("order", "desc") == "desc"), "list out of order"
        after = texts.get("after") or None
        if after is None:
            start = 0
        elif after in [x["id"] for x in full]:
            start = [x["id"] for x in full].index(after) + 1
        else:
            return  # an unknown id-shaped cursor: which page follows it is the server's choice
        limit = int(texts.get("limit") or (10000 if is_files else 20))
        assert data == full[start : start + limit], "the page does not follow the cursor and limit"
        assert page["has_more"] == (len(full) > start + limit)

    h.example(body)
