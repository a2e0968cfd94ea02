"""Garbage uploads: any bytes, purpose and filename through the normal multipart form, and
hand-made multipart bodies (wrong content types, truncated boundaries, odd part headers).

See ``harness.py`` for the guarantee under test and how an example runs.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from ..conftest import (
    FILE_FIELDS,
    line,
)
from .harness import (
    BATCH_LIMIT,
    BOM,
    COMMON_SETTINGS,
    FILE_LIMIT,
    SAFE_TEXT,
    TEXT,
    UPLOAD_PURPOSES,
    assert_client_error,
    assert_validation_outcome,
    deep,
    first_line_verdict,
    json_values,
)

# --------------------------------------------------------------------------------------------
# 1. Upload bodies through the normal multipart form


def sized_jsonl(size: int) -> bytes:
    """One valid request line, padded to exactly ``size`` bytes (newline included)."""
    base = json.dumps(line("sized", content="")).encode()
    data = json.dumps(line("sized", content="x" * (size - len(base) - 1))).encode() + b"\n"
    assert len(data) == size
    return data


def _text_variants(rows: list[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw) -> bytes:
        eol = draw(st.sampled_from([b"\n", b"\r\n"]))
        out = [draw(st.sampled_from([b"", b" ", b"\t", b"\r"])) if draw(st.integers(0, 4)) == 0 else r for r in rows]
        content = eol.join(out)
        if draw(st.booleans()):
            content += eol
        if draw(st.booleans()):
            content = BOM + content
        return content

    return build()


_good_rows = [json.dumps(line(f"v{i}")).encode() for i in range(3)]
upload_contents = st.one_of(
    st.binary(max_size=400),
    st.text(TEXT, max_size=200).map(lambda s: s.encode()),
    _text_variants(_good_rows),
    _text_variants([_good_rows[0], b"{not json", json.dumps([1, 2]).encode()]),
    _text_variants([json.dumps(v).encode() for v in ([], 5, None, "x", {"custom_id": 5})]),
    st.lists(json_values, min_size=1, max_size=4).map(lambda vs: b"\n".join(json.dumps(v).encode() for v in vs)),
)
upload_purposes = st.one_of(
    st.sampled_from(UPLOAD_PURPOSES),
    st.sampled_from(
        [
            "",
            "BATCH",
            "batch ",
            " batch",
            "batch_output",
            "fine_tune",
            "assistants_output",
            "batch\x00",
            "bätch",
            "batch\r\nX-Injected: 1",
        ]
    ),
    st.text(TEXT, max_size=40),
)
upload_filenames = st.text(SAFE_TEXT.filter(lambda c: c not in '"\\'), max_size=60)


@settings(max_examples=100, **COMMON_SETTINGS)
@given(content=upload_contents, purpose=upload_purposes, filename=upload_filenames)
@example(content=b"", purpose="batch", filename="empty.jsonl")
@example(content=BATCH_LIMIT * b"\n", purpose="batch", filename="blank-lines.jsonl")
@example(content=sized_jsonl(BATCH_LIMIT), purpose="batch", filename="at-limit.jsonl")
@example(content=sized_jsonl(BATCH_LIMIT + 1), purpose="batch", filename="over-limit.jsonl")
@example(content=b"\x00" * (FILE_LIMIT + 1), purpose="user_data", filename="over-limit.bin")
@example(content=BOM + b"\r\n\r\n" + json.dumps(line("a")).encode(), purpose="batch", filename="bom-crlf.jsonl")
@example(content=b"\xff\xfe\x00garbage\x80", purpose="batch", filename="bytes.jsonl")
@example(content=deep(10_000).encode() + b"\n", purpose="batch", filename="deep-array.jsonl")
@example(content=b'{"a":"\xff"}', purpose="batch", filename="bad-utf8-no-newline.jsonl")
@example(content=deep(10_000, "{").encode() + b"\n", purpose="batch", filename="deep-object.jsonl")
@example(content=b'{"a":1,"a":2}\n', purpose="batch", filename="dup-keys.jsonl")
@example(content=json.dumps(line("a")).encode() + b"\n", purpose="batch", filename="data;;v2.jsonl")
def test_upload_garbage_bodies(h, content, purpose, filename):
    """Any bytes, purpose and filename: a stored file that reads back exactly, or a clear 4xx."""
    if purpose not in UPLOAD_PURPOSES:
        expected, params = {400, 413}, {"purpose", "file"}
    else:
        limit = h.settings.max_batch_file_bytes if purpose == "batch" else h.settings.max_file_bytes
        if len(content) > limit:
            expected, params = {413}, {"file"}
        elif purpose != "batch":
            expected, params = {200}, None
        else:
            verdict = first_line_verdict(content)
            expected = {"object": {200}, "not_object": {400}, "empty": {200, 400}, "either": {200, 400}}[verdict]
            params = {"file", None}
    note(f"expected statuses {sorted(expected)}")

    async def body():
        before = h.storage.stored_files()
        resp = await h.api.upload(content, purpose=purpose, filename=filename)
        assert resp.status in expected, f"expected {sorted(expected)}, got {resp.status}: {resp.body[:400]!r}"
        if resp.status != 200:
            assert_client_error(resp, expected, params=params)
            assert h.storage.stored_files() == before, "a rejected upload left its content in storage"
            return
        f = resp.json()
        assert set(f) == FILE_FIELDS, f
        assert f["object"] == "file" and f["status"] == "processed" and f["purpose"] == purpose
        assert f["bytes"] == len(content)
        assert isinstance(f["filename"], str) and f["filename"] and len(f["filename"]) <= 255
        assert all(ch.isprintable() for ch in f["filename"]), f
        assert (await h.api.request("GET", f"/v1/files/{f['id']}")).ok() == f
        got = await h.api.request("GET", f"/v1/files/{f['id']}/content")
        assert got.status == 200 and got.body == content, "stored content differs from the upload"
        assert len(h.storage.stored_files()) == len(before) + 1
        if purpose == "batch":
            created = (await h.api.create_batch(f["id"])).ok()
            await assert_validation_outcome(h, content, await h.wait_validated(created["id"]))

    h.example(body)


# --------------------------------------------------------------------------------------------
# 2. Hand-made multipart bodies: wrong content types, truncated boundaries, odd part headers


@dataclass
class RawUpload:
    content_type: str | None
    body: bytes
    file_body: bytes | None  # the single file part's bytes, when exactly one is complete in ``body``
    purposes: list[str]  # the values of the purpose fields (a repeated field may be refused or taken)
    well_formed: bool  # a complete multipart/form-data body whose boundary matches the header
    describe: str = ""


def _part(
    name: str | None, value: bytes, *, filename: str | None = None, ctype: str | None = None, disposition: bool = True
) -> bytes:
    headers = []
    if disposition:
        d = "form-data"
        if name is not None:
            d += f'; name="{name}"'
        if filename is not None:
            d += f'; filename="{filename}"'
        headers.append(f"Content-Disposition: {d}")
    if ctype is not None:
        headers.append(f"Content-Type: {ctype}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + value


BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"


@st.composite
def raw_uploads(draw) -> RawUpload:
    boundary = draw(
        st.sampled_from(["XyZ", "----formdata-b0und4ry", "a" * 70])
        | st.text(BOUNDARY_CHARS, min_size=1, max_size=40).filter(lambda b: not b.endswith(" "))
    )
    parts: list[tuple[str, bytes]] = []  # (field name or "", encoded part)
    specs = draw(
        st.lists(
            st.sampled_from(
                ["purpose", "file", "file", "random", "anchor", "noname", "nodisposition", "nested", "bad-utf8-purpose"]
            ),
            max_size=4,
        )
    )
    for spec in specs:
        if spec == "purpose":
            value = draw(st.sampled_from(UPLOAD_PURPOSES) | st.text(TEXT, max_size=20))
            parts.append(("purpose", _part("purpose", value.encode())))
        elif spec == "file":
            value = draw(st.binary(max_size=120) | st.sampled_from([b'{"custom_id":"a"}\n', b"\r\n--XyZ\r\n"]))
            ctype = draw(
                st.sampled_from(
                    [
                        None,
                        "application/octet-stream",
                        "application/json",
                        "text/plain",
                        "multipart/mixed; boundary=inner",
                        "image/png",
                    ]
                )
            )
            parts.append(
                ("file", _part("file", value, filename=draw(st.sampled_from(["a.jsonl", "", "../../x"])), ctype=ctype))
            )
        elif spec == "random":
            name = draw(st.text(SAFE_TEXT.filter(lambda c: c != '"'), max_size=20))
            parts.append((name, _part(name, draw(st.binary(max_size=40)))))
        elif spec == "anchor":
            value = draw(st.sampled_from(["created_at", "", "now", "3600", "x" * 5000]))
            name = draw(st.sampled_from(["expires_after[anchor]", "expires_after[seconds]"]))
            parts.append((name, _part(name, value.encode())))
        elif spec == "noname":
            parts.append(("", _part(None, b"batch")))
        elif spec == "nodisposition":
            parts.append(("", _part(None, b"batch", disposition=False)))
        elif spec == "nested":
            inner = b"--inner\r\n" + _part("file", b"x") + b"\r\n--inner--\r\n"
            parts.append(("purpose", _part("purpose", inner, ctype="multipart/mixed; boundary=inner")))
        else:
            parts.append(("purpose", _part("purpose", b"batch\xff\xfe")))
    delim = f"--{boundary}".encode()
    body = b"".join(delim + b"\r\n" + p + b"\r\n" for _, p in parts) + delim + b"--\r\n"
    complete = len(body)
    mutation = draw(st.sampled_from(["none", "none", "truncate", "drop-close", "garbage-tail", "no-crlf"]))
    if mutation == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif mutation == "drop-close":
        body = body[: len(body) - len(delim) - 4]
    elif mutation == "garbage-tail":
        body += draw(st.binary(min_size=1, max_size=20))
    elif mutation == "no-crlf":
        body = body.replace(b"\r\n", b"\n")
    header_kind = draw(
        st.sampled_from(
            [
                "ok",
                "ok",
                "quoted",
                "no-boundary",
                "other-boundary",
                "mixed",
                "json",
                "text",
                "urlencoded",
                "none",
                "random",
            ]
        )
    )
    content_type = {
        "ok": f"multipart/form-data; boundary={boundary}",
        "quoted": f'multipart/form-data; boundary="{boundary}"',
        "no-boundary": "multipart/form-data",
        "other-boundary": f"multipart/form-data; boundary={boundary}X",
        "mixed": f"multipart/mixed; boundary={boundary}",
        "json": "application/json",
        "text": "text/plain",
        "urlencoded": "application/x-www-form-urlencoded",
        "none": None,
        "random": draw(st.text(string.printable.strip("\r\n\x0b\x0c"), max_size=40)),
    }[header_kind]
    names = [n for n, _ in parts]
    file_parts = [p for n, p in parts if n == "file"]
    file_body = None
    if len(file_parts) == 1:
        start = body.find(file_parts[0])
        if start >= 0:
            value = file_parts[0].split(b"\r\n\r\n", 1)[1]
            if body.startswith(b"\r\n" + delim, start + len(file_parts[0])):
                file_body = value
    purposes = []
    for n, p in parts:
        if n == "purpose":
            # A value that is not UTF-8 still counts as a purpose field (the service reads and refuses
            # it); decoded with U+FFFD, it never equals a valid purpose.
            purposes.append(p.split(b"\r\n\r\n", 1)[1].decode(errors="replace"))
    simple = all(n in ("purpose", "file") for n in names) and "nested" not in specs
    well_formed = (
        mutation in ("none", "garbage-tail") and header_kind in ("ok", "quoted") and simple and len(body) >= complete
    )
    return RawUpload(
        content_type,
        body,
        file_body,
        purposes,
        well_formed,
        describe=f"specs={specs} mutation={mutation} header={header_kind}",
    )


non_multipart = st.builds(
    lambda ct, body: RawUpload(ct, body, None, [], False, describe="non-multipart"),
    st.sampled_from(
        [
            None,
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "multipart",
            "multipart/form-data; boundary=",
            "application/jsonl",
        ]
    ),
    st.binary(max_size=200) | st.sampled_from([b"purpose=batch&file=abc", b'{"purpose":"batch","file":"x"}', b""]),
)


@settings(max_examples=150, **COMMON_SETTINGS)
@given(upload=st.one_of(raw_uploads(), non_multipart))
@example(
    upload=RawUpload(
        "multipart/form-data; boundary=XX",
        b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX\r\n'
        b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        + json.dumps(line("a")).encode()
        + b"\n\r\n--X",
        None,
        ["batch"],
        False,
        "truncated",
    )
)
@example(upload=RawUpload("text/plain", b"purpose=batch", None, [], False, "text body"))
@example(upload=RawUpload(None, b"", None, [], False, "empty body, no content type"))
@example(
    upload=RawUpload(
        "multipart/form-data; boundary=XyZ", b"--XyZ\r\nC", None, [], False, "truncated inside the first part's headers"
    )
)
@example(
    upload=RawUpload(
        "multipart/form-data; boundary=XyZ",
        b"--XyZ\r\nnot a header line\r\n\r\nbatch\r\n--XyZ--\r\n",
        None,
        [],
        False,
        "a part header line without a colon",
    )
)
def test_upload_malformed_multipart(h, upload):
    """A hand-made request body: a correct upload of exactly the sent file part, or a clear 4xx."""
    note(upload.describe)
    must_succeed = (
        upload.well_formed
        and upload.file_body is not None
        and len(upload.purposes) == 1
        and upload.purposes[0] in UPLOAD_PURPOSES
        and (upload.purposes[0] != "batch" or first_line_verdict(upload.file_body) == "object")
    )

    async def body():
        before = h.storage.stored_files()
        kwargs: dict[str, Any] = {"data": upload.body}
        if upload.content_type is None:
            kwargs["skip_auto_headers"] = ("Content-Type",)
        else:
            kwargs["headers"] = {"Content-Type": upload.content_type}
        resp = await h.api.request("POST", "/v1/files", **kwargs)
        if resp.status != 200:
            assert not must_succeed, f"a well-formed upload was refused: {resp.body[:400]!r}"
            assert_client_error(resp, {400, 413})
            assert h.storage.stored_files() == before, "a rejected upload left its content in storage"
            return
        f = resp.json()
        assert upload.file_body is not None, f"accepted a body without one complete file part: {f}"
        assert f["purpose"] in upload.purposes, f
        got = await h.api.request("GET", f"/v1/files/{f['id']}/content")
        assert got.status == 200 and got.body == upload.file_body, (
            f"stored {got.body[:100]!r}, but the file part was {upload.file_body[:100]!r}"
        )
        assert f["bytes"] == len(upload.file_body)

    h.example(body)
