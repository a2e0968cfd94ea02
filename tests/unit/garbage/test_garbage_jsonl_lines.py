"""Garbage JSONL lines: files mixing valid request lines and garbage lines are reported by line
number, and one line of about 10 MB is handled.

See ``harness.py`` for the guarantee under test and how an example runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from ..conftest import (
    CHAT,
    MODEL,
)
from .harness import (
    BATCH_LIMIT,
    BOM,
    COMMON_SETTINGS,
    MAX_LINES,
    REQUIRED_LINE_KEYS,
    TEXT,
    deep,
    json_values,
)

# --------------------------------------------------------------------------------------------
# 6. Line level: JSONL files mixing valid request lines and garbage lines


@dataclass
class Row:
    data: bytes  # without the line end
    kind: str  # "valid", "blank", "bad" (must be reported) or "either" (reported or accepted)
    code: str | None = None  # the error code a "bad" row must get, when the contract names one
    param: str | None = None
    what: str = ""


@dataclass
class JsonlCase:
    rows: list[Row]
    eols: list[bytes] = field(default_factory=list)  # one per row; the last may be b""
    bom: bool = False

    @property
    def content(self) -> bytes:
        eols = self.eols or [b"\n"] * len(self.rows)
        return (BOM if self.bom else b"") + b"".join(r.data + e for r, e in zip(self.rows, eols))


def _req(cid: str, content: str = "hi", **body_extra: Any) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": CHAT,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body_extra},
    }


def _enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"]
MARK = "@@MARK@@"

BAD_FIELD_VALUES = {
    "custom_id": ([5, None, [], {}, True, 1.5, ""], None),
    "method": ([None, "GET", "post", 5, [], "POST ", ""], None),
    "url": ([None, [], 5, "/v1/embeddings", CHAT + "/", CHAT.upper(), ""], "invalid_url"),
    "body": (["x", 5, [], None, True], None),
}
BAD_BODY_VALUES = {"model": [None, 3, "", [], {}, True], "stream": [True]}
EITHER_STREAM = ["yes", 1, "true", None, 0, [], "false"]


@st.composite
def valid_request(draw, cid: str) -> dict:
    req = _req(cid, draw(st.text(TEXT, max_size=20)))
    for k, v in draw(st.dictionaries(st.text(TEXT, max_size=8), json_values, max_size=2)).items():
        if k not in ("model", "stream", "messages"):
            req["body"][k] = v
    if draw(st.booleans()):
        req["body"]["stream"] = False
    return req


@st.composite
def encoded(draw, obj: Any) -> bytes:
    text = json.dumps(
        obj, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    )
    return (draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\t"]))).encode()


def _nonblank_garbage(b: bytes) -> bool:
    return b"\n" not in b and bool(b.strip(b" \t\r\x0b\x0c"))


@st.composite
def row_for(draw, index: int, first_cid: str) -> Row:
    cid = f"{draw(st.text(TEXT, max_size=12))}#{index}"
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "valid",
                "blank",
                "duplicate",
                "bad_field",
                "bad_field",
                "missing",
                "bad_body",
                "random_object",
                "not_object",
                "text",
                "bytes",
                "invalid_utf8",
                "nan",
                "trailing",
                "truncated",
                "either_stream",
                "either_dupkey",
                "either_deep",
                "either_surrogate",
                "either_extra",
            ]
        )
    )
    if kind == "valid":
        return Row(draw(encoded(draw(valid_request(cid)))), "valid")
    if kind == "blank":
        return Row(draw(st.sampled_from([b"", b" ", b"\t", b" \t ", b"\r"])), "blank")
    if kind == "duplicate":
        return Row(draw(encoded(draw(valid_request(first_cid)))), "bad", None, "custom_id", kind)
    if kind == "bad_field":
        name = draw(st.sampled_from(sorted(BAD_FIELD_VALUES)))
        values, code = BAD_FIELD_VALUES[name]
        req = draw(valid_request(cid))
        req[name] = draw(st.sampled_from(values))
        return Row(draw(encoded(req)), "bad", code, name, f"{name}={req[name]!r}")
    if kind == "missing":
        name = draw(st.sampled_from(sorted(REQUIRED_LINE_KEYS)))
        req = draw(valid_request(cid))
        del req[name]
        return Row(draw(encoded(req)), "bad", "missing_required_parameter", name, f"no {name}")
    if kind == "bad_body":
        name = draw(st.sampled_from(sorted(BAD_BODY_VALUES)))
        req = draw(valid_request(cid))
        value = draw(st.sampled_from(BAD_BODY_VALUES[name]))
        if name == "model" and draw(st.booleans()):
            del req["body"]["model"]
            value = "<missing>"
        else:
            req["body"][name] = value
        code = "streaming_unsupported" if name == "stream" else None
        return Row(draw(encoded(req)), "bad", code, f"body.{name}", f"body.{name}={value!r}")
    if kind == "random_object":
        obj = draw(
            st.dictionaries(st.text(TEXT, max_size=10), json_values, max_size=5).filter(
                lambda d: not REQUIRED_LINE_KEYS <= d.keys()
            )
        )
        return Row(draw(encoded(obj)), "bad", what=kind)
    if kind == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Row(draw(encoded(value)), "bad", "invalid_json_line", what=kind)
    if kind == "text":
        text = draw(st.text(TEXT, min_size=1, max_size=30).map(str.encode).filter(_nonblank_garbage))
        return Row(text, "bad", what=kind)
    if kind == "bytes":
        return Row(draw(st.binary(min_size=1, max_size=30).filter(_nonblank_garbage)), "bad", what=kind)
    if kind == "invalid_utf8":
        where = draw(st.sampled_from(["custom_id", "content", "body_extra", "top_extra", "model"]))
        req = _req(cid + (MARK if where == "custom_id" else ""), MARK if where == "content" else "hi")
        if where == "body_extra":
            req["body"]["user"] = MARK
        elif where == "top_extra":
            req["note"] = MARK
        elif where == "model":
            req["body"]["model"] = MODEL + MARK
        bad = draw(st.sampled_from(INVALID_UTF8))
        return Row(_enc(req).replace(MARK.encode(), bad), "bad", "invalid_json_line", what=f"{bad!r} in {where}")
    if kind == "nan":
        req = _req(cid, temperature=draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])))
        return Row(_enc(req), "bad", "invalid_json_line", what=kind)
    if kind == "trailing":
        tail = draw(st.sampled_from([b"x", b"}", b",", b"{}", b" 1", b"]", b"\x00"]))
        return Row(_enc(_req(cid)) + tail, "bad", "invalid_json_line", what=f"trailing {tail!r}")
    if kind == "truncated":
        data = _enc(_req(cid))
        return Row(data[: draw(st.integers(1, len(data) - 1))], "bad", "invalid_json_line", what=kind)
    if kind == "either_stream":
        return Row(_enc(_req(cid, stream=draw(st.sampled_from(EITHER_STREAM)))), "either", what=kind)
    if kind == "either_dupkey":
        second = draw(st.sampled_from([json.dumps(cid + "b"), "5", "null"]))
        text = (
            f'{{"custom_id": {json.dumps(cid)}, "custom_id": {second}, "method": "POST", '
            f'"url": {json.dumps(CHAT)}, "body": {json.dumps(_req(cid)["body"])}}}'
        )
        return Row(text.encode(), "either", what=kind)
    if kind == "either_deep":
        depth = draw(st.integers(1, 60))
        text = _enc(_req(cid))[:-2] + b', "x": ' + deep(depth).encode() + b"}}"
        return Row(text, "either", what=f"depth {depth}")
    if kind == "either_surrogate":
        return Row(_enc(_req(cid)).replace(b'"hi"', b'"\\ud800"'), "either", what=kind)
    req = _req(cid)
    req[draw(st.text(TEXT, min_size=1, max_size=8).filter(lambda k: k not in REQUIRED_LINE_KEYS))] = 1
    return Row(_enc(req), "either", what="extra top-level key")


@st.composite
def jsonl_cases(draw) -> JsonlCase:
    first_cid = f"{draw(st.text(TEXT, max_size=12))}#0"
    rows = [Row(draw(encoded(draw(valid_request(first_cid)))), "valid")]  # upload checks the first line
    n = draw(st.integers(0, 24))
    rows += [draw(row_for(i, first_cid)) for i in range(1, n + 1)]
    eols = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in rows]
    if draw(st.booleans()):
        eols[-1] = b""
    return JsonlCase(rows, eols, bom=draw(st.booleans()))


def _v(cid: str) -> Row:
    return Row(_enc(_req(cid)), "valid")


def _bad(obj: Any, code: str | None = None, param: str | None = None) -> Row:
    return Row(_enc(obj), "bad", code, param)


@settings(max_examples=80, **COMMON_SETTINGS)
@given(case=jsonl_cases())
@example(
    case=JsonlCase(
        [  # the named garbage, with a BOM, CRLF, blank lines and no final newline
            _v("a"),
            Row(b"", "blank"),
            Row(b"   ", "blank"),
            _bad({**_req("b"), "custom_id": 5}, None, "custom_id"),
            _bad({**_req("c"), "method": None}, None, "method"),
            _bad({**_req("d"), "url": []}, "invalid_url", "url"),
            _bad({**_req("e"), "body": "x"}, None, "body"),
            _bad(_req("f") | {"body": {"model": 3, "messages": []}}, None, "body.model"),
            Row(_enc(_req("g", stream="yes")), "either"),
            Row(
                b'{"custom_id": "h", "custom_id": "h2", "method": "POST", "url": "/v1/chat/completions", '
                b'"body": {"model": "gpt-4o-mini"}}',
                "either",
            ),
            _bad([1, 2, 3], "invalid_json_line"),
            _bad(None, "invalid_json_line"),
            _bad("str", "invalid_json_line"),
            Row(deep(10_000).encode(), "bad", "invalid_json_line"),
            _v("i"),
        ],
        eols=[b"\r\n"] * 14 + [b""],
        bom=True,
    )
)
@example(
    case=JsonlCase(
        [
            _v("a"),
            Row(
                b'{"custom_id": "x\xff", "method": "POST", "url": "/v1/chat/completions", '
                b'"body": {"model": "gpt-4o-mini"}}',
                "bad",
                "invalid_json_line",
            ),
        ]
    )
)
@example(
    case=JsonlCase(
        [
            _v("a"),
            Row(
                b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", '
                b'"body": {"model": "gpt-4o-mini", "user": "\xff"}}',
                "bad",
                "invalid_json_line",
            ),
        ]
    )
)
@example(case=JsonlCase([_v("a"), Row(_enc(_req("b"))[:-2] + b', "x": ' + deep(10_000).encode() + b"}}", "either")]))
def test_jsonl_lines_are_reported_by_line_number(h, case):
    """Mixed valid and garbage lines: ``failed`` with one error per bad line (1-based), else ``in_progress``."""
    content = case.content
    bad = {i + 1: r for i, r in enumerate(case.rows) if r.kind == "bad"}
    either = {i + 1 for i, r in enumerate(case.rows) if r.kind == "either"}
    valid = sum(1 for r in case.rows if r.kind == "valid")
    note(f"bad lines {sorted(bad)} ({[r.what for r in bad.values()]}), either {sorted(either)}, valid {valid}")
    assert len(content) <= BATCH_LIMIT and len(case.rows) <= MAX_LINES

    async def body():
        f = (await h.api.upload(content, filename="mixed.jsonl")).ok()
        got = await h.api.request("GET", f"/v1/files/{f['id']}/content")
        assert got.body == content
        created = (await h.api.create_batch(f["id"])).ok()
        batch = await h.wait_validated(created["id"])
        assert batch["status"] in ("failed", "in_progress"), batch
        if batch["status"] == "in_progress":
            assert not bad, f"bad lines {sorted(bad)} were accepted: {batch}"
            assert batch["errors"] is None and batch["model"] == MODEL
            assert batch["request_counts"] == {"total": valid + len(either), "completed": 0, "failed": 0}, batch
            return
        assert batch["failed_at"] is not None and batch["in_progress_at"] is None, batch
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}, batch
        entries = batch["errors"]["data"]
        for e in entries:
            assert set(e) == {"code", "message", "param", "line"}, e
            assert isinstance(e["code"], str) and e["code"] and isinstance(e["message"], str) and e["message"], e
        lines = [e["line"] for e in entries]
        assert all(isinstance(n, int) for n in lines), f"an error without a line number: {entries}"
        assert len(lines) == len(set(lines)), f"more than one error for a line: {entries}"
        assert set(bad) <= set(lines), f"bad lines {sorted(set(bad) - set(lines))} not reported: {entries}"
        assert set(lines) <= set(bad) | either, f"valid lines reported: {sorted(set(lines) - set(bad) - either)}"
        by_line = {e["line"]: e for e in entries}
        for n, row in bad.items():
            if row.code is not None:
                assert by_line[n]["code"] == row.code, (n, row.what, by_line[n])
            if row.param is not None and row.code != "invalid_json_line":
                assert by_line[n]["param"] == row.param, (n, row.what, by_line[n])

    h.example(body)


# --------------------------------------------------------------------------------------------
# 7. One line of about 10 MB (explicit examples only)


TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize("case", ["valid-10mb-line", "garbage-10mb-line"])
def test_ten_megabyte_line(harness, case):
    """A ~10 MB line is stored byte for byte and validated like any other line."""
    h = harness(max_batch_file_bytes=16 * 1024 * 1024, max_file_bytes=16 * 1024 * 1024)
    if case == "valid-10mb-line":
        content = _enc(_req("big", "x" * TEN_MB)) + b"\n"
    else:
        content = _enc(_req("small")) + b"\n" + b'{"custom_id": "big", ' + b"y" * TEN_MB + b"\n"

    async def body():
        f = (await h.api.upload(content, filename="big.jsonl")).ok()
        assert f["bytes"] == len(content)
        got = await h.api.request("GET", f"/v1/files/{f['id']}/content")
        assert got.status == 200 and got.body == content
        batch = await h.wait_validated((await h.api.create_batch(f["id"])).ok()["id"])
        if case == "valid-10mb-line":
            assert batch["status"] == "in_progress", batch
            assert batch["request_counts"]["total"] == 1
        else:
            assert batch["status"] == "failed", batch
            assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("invalid_json_line", 2)]

    h.example(body)
