"""The harness of the garbage-input tests: one app per test on a private loop, seeded with data
that must survive every example, the oracles that judge an answer, and shared strategies.

The guarantee under test (see the ``test_garbage_*`` modules here): every answer is either a clear
4xx with the OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}`` or a correct
result (a stored file that reads back byte for byte; a batch that ends ``failed`` with one error per
bad line, or ``in_progress`` with the right ``request_counts.total``). Never a 500, never a hang
(every wait is bounded), never a dead app, and nothing stored before is lost or changed.

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
from pathlib import Path
from typing import Any, Callable

import fakeredis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck
from hypothesis import strategies as st

from service.core.config import Settings
from service.web.app import create_app

from ..conftest import (
    DEFAULT_SETTINGS,
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
EXAMPLE_TIMEOUT_S = 120.0  # one example, all its requests included: a hang detector, not a speed limit
VALIDATION_TIMEOUT_S = 30.0  # a small file is validated in milliseconds: 30 s is a hang even on a loaded box
MAX_JSON_BODY = 1024 * 1024  # the app's client_max_size for JSON bodies

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FILE_PURPOSES = UPLOAD_PURPOSES + ("assistants_output", "batch_output", "fine-tune-results")
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
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
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
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
        self.settings = Settings(
            **{
                **DEFAULT_SETTINGS,
                **_routing_defaults(),
                "max_batch_file_bytes": BATCH_LIMIT,
                "max_file_bytes": FILE_LIMIT,
                "max_batch_lines": MAX_LINES,
                "data_dir": root,
                **overrides,
            }
        )
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
                raise AssertionError(
                    f"batch {batch_id} still 'validating' after {VALIDATION_TIMEOUT_S}s "
                    f"(the validator hangs or crashed): {batch}"
                )
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


# --------------------------------------------------------------------------------------------
# Oracles


def assert_client_error(
    resp: Response, statuses: set[int] | frozenset[int] = frozenset({400}), *, params: set | None = None
) -> dict:
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
        content = content[len(BOM) :]
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
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT, max_size=16)
)
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
