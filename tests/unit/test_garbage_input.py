"""Property-based garbage input (hypothesis) against the upload endpoint, the batch endpoints and the
line validator.

The guarantee under test: every answer is either a clear 4xx with the OpenAI error envelope
``{"error": {"message", "type", "param", "code"}}`` or a correct result (a stored file that reads back
byte for byte; a batch that ends ``failed`` with one error per bad line, or ``in_progress`` with the
right ``request_counts.total``). Never a 500, never a hang (every wait is bounded), never a dead app,
and nothing stored before is lost or changed.

How it runs: each test builds one app (fakeredis + temporary storage, in-process publisher) on its own
event loop (:class:`Harness`), seeds a known-good batch file, a ``user_data`` file and a batch on the
good file, then lets hypothesis run its examples against that one app. After every example
:meth:`Harness.check_intact` asserts that the app still answers ``/healthz`` and normal lists, and that
the seeded files and batch are unchanged. The tests are sync functions that drive the loop themselves,
so hypothesis and pytest-aiohttp never share a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import fakeredis
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from yarl import URL

from service.core.config import Settings
from service.web.app import create_app

from .conftest import (
    BATCH_FIELDS,
    CHAT,
    DEFAULT_SETTINGS,
    FILE_FIELDS,
    MODEL,
    Api,
    GatedStorage,
    Response,
    line,
)

# --------------------------------------------------------------------------------------------
# Limits and bounds

BATCH_LIMIT = 64 * 1024  # max_batch_file_bytes of the default harness
FILE_LIMIT = 128 * 1024  # max_file_bytes of the default harness
MAX_LINES = 64  # max_batch_lines of the default harness
EXAMPLE_TIMEOUT_S = 20.0  # one example, all its requests included
VALIDATION_TIMEOUT_S = 3.0  # a small file is validated in milliseconds; longer is a hang
MAX_JSON_BODY = 1024 * 1024  # the app's client_max_size for JSON bodies

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FILE_PURPOSES = UPLOAD_PURPOSES + ("assistants_output", "batch_output", "fine-tune-results")
BATCH_ENDPOINTS = (
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations",
    "/v1/images/generations", "/v1/images/edits", "/v1/videos",
)
CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")
REQUIRED_LINE_KEYS = {"custom_id", "method", "url", "body"}
BOM = b"\xef\xbb\xbf"
ID_RE = re.compile(r"\A(file-|batch_)[0-9a-f]{24}\Z")

# Sentinels replaced at run time by the ids the harness seeded.
GOOD_FILE = "<<good-file-id>>"
OTHER_FILE = "<<user-data-file-id>>"
GOOD_BATCH = "<<good-batch-id>>"

COMMON_SETTINGS = dict(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
    deadline=None,
    database=None,
)


# --------------------------------------------------------------------------------------------
# Harness: one app on a private loop, seeded with data that must survive every example


def _routing_defaults() -> dict[str, Any]:
    """A catch-all upstream when the settings route models to providers and the unit defaults name none.

    No request is ever sent (no workers run here); validation only needs every model to be served.
    """
    if "providers" not in {f.name for f in dataclasses.fields(Settings)} or "providers" in DEFAULT_SETTINGS:
        return {}
    from service.core.config import Provider  # only where the settings have providers

    return {"providers": (Provider(name="default", base_url="http://127.0.0.1:9", models=("*",)),)}


class Harness:
    def __init__(self, root: Path, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(**{
            **DEFAULT_SETTINGS, **_routing_defaults(), "max_batch_file_bytes": BATCH_LIMIT,
            "max_file_bytes": FILE_LIMIT, "max_batch_lines": MAX_LINES, "data_dir": root, **overrides,
        })
        self.storage = GatedStorage(root)
        redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        app = create_app(self.settings, redis=redis, storage=self.storage)

        async def start() -> TestClient:
            client = TestClient(TestServer(app))
            await client.start_server()
            return client

        self.client = self.loop.run_until_complete(start())
        self.api = Api(self.client, self.storage, self.settings)
        self.good_content = b"".join(json.dumps(line(f"seed-{i}")).encode() + b"\n" for i in (1, 2))
        self.other_content = b"\x00\xffseed bytes, not JSON\r\n"
        try:
            self.run(self._seed())
        except BaseException:
            self.close()
            raise

    async def _seed(self) -> None:
        api = self.api
        self.good_file = (await api.upload(self.good_content, filename="seed.jsonl")).ok()
        self.other_file = (await api.upload(self.other_content, purpose="user_data", filename="seed.bin")).ok()
        created = (await api.create_batch(self.good_file["id"], metadata={"seed": "yes"})).ok()
        self.good_batch = await self.wait_validated(created["id"])
        assert self.good_batch["status"] == "in_progress", self.good_batch
        assert self.good_batch["request_counts"]["total"] == 2

    def run(self, coro, timeout: float = EXAMPLE_TIMEOUT_S) -> Any:
        """Run ``coro`` on the harness loop; more than ``timeout`` seconds is a hang."""
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise AssertionError(f"no answer within {timeout}s: the app hangs") from None

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def resolve(self, value: Any) -> Any:
        """``value`` with the id sentinels replaced by the seeded ids."""
        ids = {GOOD_FILE: self.good_file["id"], OTHER_FILE: self.other_file["id"], GOOD_BATCH: self.good_batch["id"]}
        if isinstance(value, str):
            return ids.get(value, value)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {self.resolve(k): self.resolve(v) for k, v in value.items()}
        return value

    async def wait_validated(self, batch_id: str) -> dict:
        """The batch once it left ``validating``; staying there longer than the bound is a hang."""
        deadline = self.loop.time() + VALIDATION_TIMEOUT_S
        while True:
            batch = (await self.api.request("GET", f"/v1/batches/{batch_id}")).ok()
            if batch["status"] != "validating":
                return batch
            if self.loop.time() > deadline:
                raise AssertionError(f"batch {batch_id} still 'validating' after {VALIDATION_TIMEOUT_S}s "
                                     f"(the validator hangs or crashed): {batch}")
            await asyncio.sleep(0.01)

    async def check_intact(self) -> None:
        """The app is alive, lists work, and the seeded data is exactly as it was."""
        api = self.api
        health = await api.request("GET", "/healthz", token=None)
        assert health.ok() == {"status": "ok"}
        files = (await api.request("GET", "/v1/files", params={"order": "asc", "limit": "2"})).ok()
        assert files["object"] == "list" and isinstance(files["has_more"], bool)
        assert files["data"] == [self.good_file, self.other_file], files
        batches = (await api.request("GET", "/v1/batches", params={"limit": "1"})).ok()
        assert batches["object"] == "list" and isinstance(batches["data"], list) and batches["data"]
        for f, content in ((self.good_file, self.good_content), (self.other_file, self.other_content)):
            assert (await api.request("GET", f"/v1/files/{f['id']}")).ok() == f
            got = await api.request("GET", f"/v1/files/{f['id']}/content")
            assert got.status == 200 and got.body == content, f"stored content of {f['id']} changed"
        assert (await api.request("GET", f"/v1/batches/{self.good_batch['id']}")).ok() == self.good_batch
        assert self.storage.temp_files() == [], "an upload left a partial file behind"

    def example(self, body: Callable[[], Any]) -> None:
        """Run one example's async ``body`` and then the invariants."""
        self.run(body())
        self.run(self.check_intact())


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def factory(**overrides: Any) -> Harness:
        h = Harness(tmp_path / f"data{len(made)}", **overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def h(harness) -> Harness:
    return harness()


# --------------------------------------------------------------------------------------------
# Oracles


def assert_client_error(resp: Response, statuses: set[int] | frozenset[int] = frozenset({400}), *,
                        params: set | None = None) -> dict:
    """A 4xx in ``statuses`` with the exact OpenAI envelope; ``params`` limits ``error.param``."""
    assert resp.status < 500, f"server error {resp.status}: {resp.body[:500]!r}"
    assert resp.status in statuses, f"expected one of {sorted(statuses)}, got {resp.status}: {resp.body[:500]!r}"
    err = resp.error(resp.status)
    if params is not None:
        assert err["param"] in params, f"param {err['param']!r} not in {params}: {err}"
    return err


def _blank(raw: bytes) -> bool:
    """Blank by any reading: only JSON whitespace."""
    return not raw.strip(b" \t\r")


def _physical_lines(content: bytes) -> list[bytes]:
    if content.startswith(BOM):
        content = content[len(BOM):]
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


class _Unsure(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Unsure("out-of-range number")
    return value


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


def json_object_verdict(raw: bytes) -> str:
    """'object', 'not_object', or 'either' (valid JSON that a strict parser may still refuse)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_object"
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_float)
    except (_Unsure, RecursionError):
        return "either"
    except ValueError:
        return "not_object"
    if _has_surrogate(value):
        return "either"
    return "object" if isinstance(value, dict) else "not_object"


def first_line_verdict(content: bytes) -> str:
    """What the upload of ``content`` as purpose=batch may answer: 'object', 'not_object', 'empty', 'either'."""
    for raw in _physical_lines(content):
        if _blank(raw):
            continue
        if not raw.strip():  # only \v / \f besides JSON whitespace: blank or garbage, both defensible
            return "either"
        return json_object_verdict(raw)
    return "empty"


async def assert_validation_outcome(h: Harness, content: bytes, batch: dict) -> None:
    """Loose check of a batch on arbitrary content: it ends, and its errors name real, distinct lines."""
    lines = _physical_lines(content)
    assert batch["status"] in ("failed", "in_progress"), batch
    if batch["status"] == "in_progress":
        assert batch["errors"] is None, batch
        nonblank = sum(1 for raw in lines if raw.strip())
        assert batch["request_counts"] == {"total": nonblank, "completed": 0, "failed": 0}, (batch, nonblank)
        return
    data = batch["errors"]["data"]
    assert data, batch
    numbered = [e["line"] for e in data if e["line"] is not None]
    assert len(numbered) == len(set(numbered)), f"more than one error for a line: {data}"
    for n in numbered:
        assert isinstance(n, int) and 1 <= n <= len(lines), f"error names line {n} of {len(lines)}: {data}"
        assert not _blank(lines[n - 1]), f"error names blank line {n}: {data}"


# --------------------------------------------------------------------------------------------
# Strategies: JSON values and text

TEXT = st.characters(exclude_categories=("Cs",))
SAFE_TEXT = st.characters(exclude_categories=("Cs", "Cc"))
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(TEXT, max_size=16))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(TEXT, max_size=8), inner, max_size=4),
    max_leaves=10,
)
huge_strings = st.integers(0, 1_500_000).map(lambda n: "h" * n)


def deep(depth: int, kind: str = "[") -> str:
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


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
    st.sampled_from(["", "BATCH", "batch ", " batch", "batch_output", "fine_tune", "assistants_output",
                     "batch\x00", "bätch", "batch\r\nX-Injected: 1"]),
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


def _part(name: str | None, value: bytes, *, filename: str | None = None, ctype: str | None = None,
          disposition: bool = True) -> bytes:
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
    boundary = draw(st.sampled_from(["XyZ", "----formdata-b0und4ry", "a" * 70])
                    | st.text(BOUNDARY_CHARS, min_size=1, max_size=40).filter(lambda b: not b.endswith(" ")))
    parts: list[tuple[str, bytes]] = []  # (field name or "", encoded part)
    specs = draw(st.lists(st.sampled_from(["purpose", "file", "file", "random", "anchor", "noname",
                                           "nodisposition", "nested", "bad-utf8-purpose"]), max_size=4))
    for spec in specs:
        if spec == "purpose":
            value = draw(st.sampled_from(UPLOAD_PURPOSES) | st.text(TEXT, max_size=20))
            parts.append(("purpose", _part("purpose", value.encode())))
        elif spec == "file":
            value = draw(st.binary(max_size=120) | st.sampled_from([b'{"custom_id":"a"}\n', b"\r\n--XyZ\r\n"]))
            ctype = draw(st.sampled_from([None, "application/octet-stream", "application/json", "text/plain",
                                          "multipart/mixed; boundary=inner", "image/png"]))
            parts.append(("file", _part("file", value, filename=draw(st.sampled_from(["a.jsonl", "", "../../x"])),
                                        ctype=ctype)))
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
    header_kind = draw(st.sampled_from(["ok", "ok", "quoted", "no-boundary", "other-boundary", "mixed",
                                        "json", "text", "urlencoded", "none", "random"]))
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
            try:
                purposes.append(p.split(b"\r\n\r\n", 1)[1].decode())
            except UnicodeDecodeError:
                pass
    simple = all(n in ("purpose", "file") for n in names) and "nested" not in specs
    well_formed = (mutation in ("none", "garbage-tail") and header_kind in ("ok", "quoted") and simple
                   and len(body) >= complete)
    return RawUpload(content_type, body, file_body, purposes, well_formed,
                     describe=f"specs={specs} mutation={mutation} header={header_kind}")


non_multipart = st.builds(
    lambda ct, body: RawUpload(ct, body, None, [], False, describe="non-multipart"),
    st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                     "application/octet-stream", "multipart", "multipart/form-data; boundary=",
                     "application/jsonl"]),
    st.binary(max_size=200) | st.sampled_from([b"purpose=batch&file=abc", b'{"purpose":"batch","file":"x"}', b""]),
)


@settings(max_examples=150, **COMMON_SETTINGS)
@given(upload=st.one_of(raw_uploads(), non_multipart))
@example(upload=RawUpload("multipart/form-data; boundary=XX",
                          b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX\r\n'
                          b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
                          + json.dumps(line("a")).encode() + b"\n\r\n--X", None, ["batch"], False, "truncated"))
@example(upload=RawUpload("text/plain", b"purpose=batch", None, [], False, "text body"))
@example(upload=RawUpload(None, b"", None, [], False, "empty body, no content type"))
@example(upload=RawUpload("multipart/form-data; boundary=XyZ", b"--XyZ\r\nC", None, [], False,
                          "truncated inside the first part's headers"))
@example(upload=RawUpload("multipart/form-data; boundary=XyZ",
                          b"--XyZ\r\nnot a header line\r\n\r\nbatch\r\n--XyZ--\r\n", None, [], False,
                          "a part header line without a colon"))
def test_upload_malformed_multipart(h, upload):
    """A hand-made request body: a correct upload of exactly the sent file part, or a clear 4xx."""
    note(upload.describe)
    must_succeed = (upload.well_formed and upload.file_body is not None and len(upload.purposes) == 1
                    and upload.purposes[0] in UPLOAD_PURPOSES
                    and (upload.purposes[0] != "batch" or first_line_verdict(upload.file_body) == "object"))

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
            f"stored {got.body[:100]!r}, but the file part was {upload.file_body[:100]!r}")
        assert f["bytes"] == len(upload.file_body)

    h.example(body)


# --------------------------------------------------------------------------------------------
# 3. POST /v1/batches with garbage JSON bodies and content types


def create_verdict(body: Any) -> str:
    """'ok' (must be created), 'bad' (must be refused) or 'either' for a decoded create body."""
    if not isinstance(body, dict):
        return "bad"
    if any(k not in CREATE_FIELDS for k in body):
        return "bad"
    if body.get("input_file_id") != GOOD_FILE:
        return "bad"
    if body.get("endpoint") not in BATCH_ENDPOINTS or body.get("completion_window") not in ("24h", "1h"):
        return "bad"
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            return "bad"
        if any(len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in metadata.items()):
            return "bad"
    oea = body.get("output_expires_after")
    verdict = "ok"
    if oea is not None:
        if not isinstance(oea, dict) or oea.get("anchor") != "created_at":
            return "bad"
        seconds = oea.get("seconds")
        if isinstance(seconds, int) and not isinstance(seconds, bool):
            if not 3600 <= seconds <= 2592000:
                return "bad"
        elif isinstance(seconds, (float, str)):
            verdict = "either"  # "3600" / 3600.0: leniency is acceptable
        else:
            return "bad"
        if set(oea) - {"anchor", "seconds"}:
            verdict = "either"
    return verdict


create_values = {
    "input_file_id": st.sampled_from([GOOD_FILE, GOOD_FILE, OTHER_FILE, GOOD_BATCH, "", "file-" + "0" * 24, None, 5,
                                      [], "../file", "file-\x00"]) | st.text(TEXT, max_size=30) | huge_strings,
    "endpoint": st.sampled_from(BATCH_ENDPOINTS + (CHAT, CHAT, "", "/v1/chat/completions/", "/V1/CHAT/COMPLETIONS",
                                                   None, 7)) | st.text(TEXT, max_size=20),
    "completion_window": st.sampled_from(["24h", "24h", "24h", "1h", "24H", "", None, 24, "24h "]),
    "metadata": st.none() | st.dictionaries(st.text(TEXT, max_size=70), st.text(TEXT, max_size=20) | json_values,
                                            max_size=18) | json_values,
    "output_expires_after": st.none() | st.fixed_dictionaries(
        {"anchor": st.sampled_from(["created_at", "created_at", "now", None, 1]),
         "seconds": st.sampled_from([3600, 7200, 2592000, 3599, 2592001, 0, -1, "3600", 3600.0, 3600.5, True,
                                     None, [], 10**30, "1e999", "x"])}) | json_values,
}


@st.composite
def near_valid_create(draw) -> dict:
    body = {}
    for name, values in create_values.items():
        if draw(st.integers(0, 9)) == 0 and name in ("input_file_id", "endpoint", "completion_window"):
            continue  # missing required field
        if name in ("metadata", "output_expires_after") and draw(st.booleans()):
            continue
        body[name] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(TEXT, max_size=20))] = draw(json_values)
    return body


random_objects = st.dictionaries(st.sampled_from(CREATE_FIELDS) | st.text(TEXT, max_size=20), json_values, max_size=6)
json_content_types = st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8",
                                      "application/vnd.openai+json", None])
bad_content_types = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                     "application/jsonl", "application/octet-stream", "text/json"])


@dataclass
class CreateCase:
    content_type: str | None
    json_body: Any = None  # encoded by the test (after id sentinels are resolved)
    raw: bytes | None = None  # sent as-is


create_cases = st.one_of(
    st.builds(CreateCase, json_content_types, near_valid_create()),
    st.builds(CreateCase, json_content_types, random_objects),
    st.builds(CreateCase, json_content_types, json_values),
    st.builds(CreateCase, bad_content_types, near_valid_create()),
    st.builds(CreateCase, json_content_types | bad_content_types | st.text(string.ascii_letters + "/+;=-", max_size=30),
              st.none(), st.binary(max_size=300)),
)
_valid_create = {"input_file_id": GOOD_FILE, "endpoint": CHAT, "completion_window": "24h"}


@settings(max_examples=120, **COMMON_SETTINGS)
@given(case=create_cases)
@example(case=CreateCase("application/json", dict(_valid_create)))
@example(case=CreateCase("application/json", {**_valid_create, "endpoint": "/v1/embeddings", "metadata": {"k": "v"}}))
@example(case=CreateCase("application/json", {**_valid_create, "input_file_id": "x" * (2 * MAX_JSON_BODY)}))
@example(case=CreateCase("application/json", {**_valid_create, "input_file_id": "x" * 500_000}))
@example(case=CreateCase("application/json", {**_valid_create, "metadata": {"k": "v" * 100_000}}))
@example(case=CreateCase("text/plain", dict(_valid_create)))
@example(case=CreateCase("application/json", None, b"not json at all"))
@example(case=CreateCase("application/json", None, b""))
@example(case=CreateCase("application/json", None, deep(10_000).encode()))
@example(case=CreateCase("application/json", None, b'{"input_file_id": "\xff"}'))
def test_create_batch_garbage_bodies(h, case):
    """POST /v1/batches: a created batch that validates correctly, or a clear 4xx."""
    if case.raw is not None:
        payload = case.raw
        verdict = "bad" if json_object_verdict(payload.strip()) != "object" else "either"
    else:
        payload = json.dumps(h.resolve(case.json_body)).encode()
        verdict = create_verdict(case.json_body)
    ct = case.content_type
    if ct is not None and ct.split(";")[0].strip() not in ("application/json", "application/vnd.openai+json"):
        verdict = "bad" if ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                  "application/jsonl", "application/octet-stream", "text/json") else "either"
    verdict_before_size = verdict
    if len(payload) > MAX_JSON_BODY:
        verdict = "bad"
    note(f"verdict {verdict}, {len(payload)} bytes")

    async def body():
        kwargs: dict[str, Any] = {"data": payload}
        if ct is None:
            kwargs["skip_auto_headers"] = ("Content-Type",)
        else:
            kwargs["headers"] = {"Content-Type": ct}
        resp = await h.api.request("POST", "/v1/batches", **kwargs)
        if resp.status != 200:
            assert verdict != "ok", f"a valid create was refused: {resp.status} {resp.body[:400]!r}"
            err = assert_client_error(resp, {400, 404, 413})
            if len(payload) > MAX_JSON_BODY and verdict_before_size != "bad":
                assert resp.status == 413, err
            return
        assert verdict != "bad", f"an invalid create was accepted: {resp.body[:400]!r}"
        batch = resp.json()
        sent = json.loads(payload)
        assert set(batch) == BATCH_FIELDS, batch
        assert batch["status"] == "validating" and batch["object"] == "batch", batch
        assert batch["input_file_id"] == h.good_file["id"] and batch["endpoint"] == sent["endpoint"]
        assert batch["completion_window"] == sent["completion_window"] and batch["metadata"] == sent.get("metadata")
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        done = await h.wait_validated(batch["id"])
        if sent["endpoint"] == CHAT:
            assert done["status"] == "in_progress", done
            assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
            assert done["model"] == MODEL
        else:  # the seeded lines target chat completions
            assert done["status"] == "failed", done
            assert [(e["code"], e["line"]) for e in done["errors"]["data"]] == [("invalid_url", 1), ("invalid_url", 2)]

    h.example(body)


# --------------------------------------------------------------------------------------------
# 4. Query parameters of the list endpoints


@dataclass(frozen=True)
class RawValue:
    """A query value sent as percent-encoded raw bytes (may be invalid UTF-8)."""

    data: bytes


limit_values = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(-5, 120).map(str),
    st.sampled_from(["", "0", "-1", "1", "2", "100", "101", "10000", "10001", "1e3", "0x10", " 5", "5 ", "+5", "1_0",
                     "٣", "9" * 5000, "NaN", "inf", "\x00", "1.5", "١٠"]),
    st.text(TEXT, max_size=12),
    st.binary(max_size=8).map(RawValue),
)
after_values = st.one_of(
    st.sampled_from(["", GOOD_FILE, OTHER_FILE, GOOD_BATCH, "file-" + "0" * 24, "batch_" + "f" * 24, "file-",
                     "../x", "%00", "file-" + "0" * 23 + "g"]),
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
    for k, v in draw(st.dictionaries(st.text(TEXT, min_size=1, max_size=10), st.text(TEXT, max_size=10),
                                     max_size=2)).items():
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
        assert data == full[start:start + limit], "the page does not follow the cursor and limit"
        assert page["has_more"] == (len(full) > start + limit)

    h.example(body)


# --------------------------------------------------------------------------------------------
# 5. Ids with path characters in every by-id route


nasty_ids = st.sampled_from([
    "..", "../", "../../etc/passwd", "%2e%2e%2f", "%2e%2e%2fbatches", "..%2f..%2f", "%2E%2E/%2E%2E/", "\x00",
    "file-\x00", "a\x00b", "file-" + "0" * 24 + "\x00", "%00", "file-../../x", "batch_../x", ".", "./", "~",
    "\u202efile", "😀" * 50, "a" * 4000, " ", "\t", "\r\n", "%", "%%", "%zz", "?", "#", "?after=x", "#frag", ";",
    "\\..\\..\\", "C:\\Windows", "file-٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩٠١٢٣", "FILE-" + "0" * 24, "file-" + "0" * 25,
    "batch_" + "0" * 24 + "/..", "data/files", "..%00", "%c0%ae%c0%ae/", "cancel", "content",
])
any_ids = st.one_of(
    nasty_ids,
    st.text(TEXT, min_size=1, max_size=200),
    st.integers(256, 4000).map(lambda n: "z" * n),
    st.from_regex(r"\A(file-|batch_)[0-9a-f]{24}\Z"),
    st.lists(st.sampled_from(["..", ".", "%2e%2e", "x", "%2f", "/", "files", "batches", "v1"]), min_size=1,
             max_size=6).map("/".join),
)


@settings(max_examples=60, **COMMON_SETTINGS)
@given(object_id=any_ids, raw=st.booleans())
@example(object_id="../../etc/passwd", raw=True)
@example(object_id="%2e%2e%2f%2e%2e%2f", raw=True)
@example(object_id="%2e%2e%2f%2e%2e%2f", raw=False)
@example(object_id="a\x00b", raw=False)
@example(object_id="ünïcødé-✓-файл", raw=False)
@example(object_id="z" * 4000, raw=False)
def test_ids_with_path_characters(h, object_id, raw):
    """By-id routes with hostile ids: 404/400/405 envelopes, never another object or a changed one."""
    if raw:  # dots, slashes and percent escapes reach the server as typed
        encoded = quote(object_id, safe="/.%~;")
    else:
        encoded = quote(object_id, safe="")
    note(f"path segment {encoded[:200]!r}")
    routes = [
        ("GET", f"/v1/files/{encoded}", True),
        ("GET", f"/v1/files/{encoded}/content", False),
        ("DELETE", f"/v1/files/{encoded}", False),
        ("GET", f"/v1/batches/{encoded}", True),
        ("POST", f"/v1/batches/{encoded}/cancel", False),
    ]

    async def body():
        for method, path, may_list in routes:
            kwargs: dict[str, Any] = {}
            if method == "POST":  # what the SDK sends on cancel
                kwargs = {"data": b"", "headers": {"Content-Type": "application/json"}}
            resp = await h.api.request(method, URL(path, encoded=True), **kwargs)
            if resp.status == 200:
                # Dot segments may legitimately resolve to a list route; nothing else may succeed.
                assert may_list and raw, f"{method} {path[:100]} succeeded: {resp.body[:300]!r}"
                assert resp.json()["object"] == "list", resp.body[:300]
                continue
            assert_client_error(resp, {400, 404, 405})

    h.example(body)


def test_overlong_id_gets_error_envelope(h):
    """A 10,000-character id (a request line over aiohttp's 8190-byte limit) still gets the OpenAI envelope."""
    routes = [("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}"),
              ("GET", "/v1/batches/{}"), ("POST", "/v1/batches/{}/cancel")]

    async def body():
        answers = [await h.api.request(method, URL(template.format("z" * 10_000), encoded=True))
                   for method, template in routes]
        problems = []
        for (method, template), resp in zip(routes, answers):
            try:
                assert_client_error(resp, {400, 404, 414, 431})
            except AssertionError as e:
                problems.append(f"{method} {template}: {str(e).splitlines()[0][:300]}")
        assert not problems, "\n".join(problems)

    h.example(body)


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
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body_extra}}


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
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    return (draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\t"]))).encode()


def _nonblank_garbage(b: bytes) -> bool:
    return b"\n" not in b and bool(b.strip(b" \t\r\x0b\x0c"))


@st.composite
def row_for(draw, index: int, first_cid: str) -> Row:
    cid = f"{draw(st.text(TEXT, max_size=12))}#{index}"
    kind = draw(st.sampled_from([
        "valid", "valid", "valid", "blank", "duplicate", "bad_field", "bad_field", "missing", "bad_body",
        "random_object", "not_object", "text", "bytes", "invalid_utf8", "nan", "trailing", "truncated",
        "either_stream", "either_dupkey", "either_deep", "either_surrogate", "either_extra",
    ]))
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
        obj = draw(st.dictionaries(st.text(TEXT, max_size=10), json_values, max_size=5)
                   .filter(lambda d: not REQUIRED_LINE_KEYS <= d.keys()))
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
        text = (f'{{"custom_id": {json.dumps(cid)}, "custom_id": {second}, "method": "POST", '
                f'"url": {json.dumps(CHAT)}, "body": {json.dumps(_req(cid)["body"])}}}')
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
@example(case=JsonlCase([  # the named garbage, with a BOM, CRLF, blank lines and no final newline
    _v("a"), Row(b"", "blank"), Row(b"   ", "blank"),
    _bad({**_req("b"), "custom_id": 5}, None, "custom_id"),
    _bad({**_req("c"), "method": None}, None, "method"),
    _bad({**_req("d"), "url": []}, "invalid_url", "url"),
    _bad({**_req("e"), "body": "x"}, None, "body"),
    _bad(_req("f") | {"body": {"model": 3, "messages": []}}, None, "body.model"),
    Row(_enc(_req("g", stream="yes")), "either"),
    Row(b'{"custom_id": "h", "custom_id": "h2", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "gpt-4o-mini"}}', "either"),
    _bad([1, 2, 3], "invalid_json_line"), _bad(None, "invalid_json_line"), _bad("str", "invalid_json_line"),
    Row(deep(10_000).encode(), "bad", "invalid_json_line"),
    _v("i"),
], eols=[b"\r\n"] * 14 + [b""], bom=True))
@example(case=JsonlCase([_v("a"), Row(b'{"custom_id": "x\xff", "method": "POST", "url": "/v1/chat/completions", '
                                      b'"body": {"model": "gpt-4o-mini"}}', "bad", "invalid_json_line")]))
@example(case=JsonlCase([_v("a"), Row(b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", '
                                      b'"body": {"model": "gpt-4o-mini", "user": "\xff"}}', "bad",
                                      "invalid_json_line")]))
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
