"""Fixtures for the fast unit tests of the HTTP API.

Each test gets its own app (``service.web.create_app``) on a private in-memory fakeredis server and
a temporary storage directory, served by pytest-aiohttp's test server. The app's cleanup context
runs the publisher in-process, so batch validation happens inside the test; no workers or finalizer
run, so a valid batch stops at ``in_progress``.

Fixtures
--------
``make_api``   async factory: ``await make_api(**settings_overrides)`` returns an :class:`Api`.
``api``        an :class:`Api` on default unit settings (small limits, tokens ``tok-a``/``tok-b``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import fakeredis
import pytest
from aiohttp import FormData
from yarl import URL

from service.core.config import Provider, Settings
from service.core.storage import CHUNK, LocalStorage
from service.web.app import create_app

TOKEN_A = "tok-a"
TOKEN_B = "tok-b"
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"

# Small limits keep limit tests cheap.
DEFAULT_SETTINGS = dict(
    api_tokens=(TOKEN_A, TOKEN_B),
    # No worker runs in unit tests: the provider only has to exist for validation to route lines.
    providers=(Provider(name="default", base_url="http://127.0.0.1:9", models=("*",)),),
    max_batch_lines=5,
    max_batch_file_bytes=4096,
    max_file_bytes=8192,
)

ERROR_KEYS = {"message", "type", "param", "code"}

BATCH_FIELDS = {
    "id",
    "object",
    "endpoint",
    "input_file_id",
    "completion_window",
    "status",
    "created_at",
    "model",
    "errors",
    "output_file_id",
    "error_file_id",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
}
FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}


# --------------------------------------------------------------------------------------------
# Helpers


class PollTimeout(AssertionError):
    pass


async def poll(predicate, *, timeout: float = 30.0, interval: float = 0.01, message: str = "condition"):
    """Await ``predicate()`` until it returns something truthy; return it. Raise on timeout.

    ``timeout`` is a failure deadline, not a speed limit: what it waits for takes milliseconds.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise PollTimeout(f"timed out after {timeout}s waiting for {message}; last value {last!r}")
        await asyncio.sleep(interval)


def line(
    custom_id: str, *, model: str | None = MODEL, url: str = CHAT, method: str = "POST", **body_extra: Any
) -> dict:
    """A valid chat-completions request line (``model=None`` leaves the model out)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": f"hello {custom_id}"}], **body_extra}
    if model is not None:
        body["model"] = model
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def jsonl(rows: Iterable[Any], *, eol: str = "\n") -> bytes:
    """JSONL bytes: dicts are encoded, ``str`` rows are written verbatim."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + eol for r in rows).encode()


def good_jsonl(n: int = 2) -> bytes:
    return jsonl(line(f"req-{i}") for i in range(1, n + 1))


class GatedStorage(LocalStorage):
    """LocalStorage whose reads can be held back (``hold()``/``release()``) to freeze the publisher."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def hold(self) -> None:
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncIterator[bytes]:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        async for chunk in super().read(key, chunk_size, offset):
            yield chunk

    def stored_files(self) -> list[str]:
        return sorted(p.name for p in (self.root / "files").iterdir())

    def temp_files(self) -> list[str]:
        return sorted(p.name for p in (self.root / "tmp").iterdir())


class Response:
    """Status, headers and body of one response (read eagerly)."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        assert "json" in self.content_type.split(";")[0], f"not JSON ({self.content_type!r}): {self.body[:300]!r}"
        return json.loads(self.body)

    def ok(self, status: int = 200) -> Any:
        """Assert ``status`` and return the JSON body."""
        assert self.status == status, f"expected {status}, got {self.status}: {self.body[:500]!r}"
        return self.json()

    def error(self, status: int, *, param: Any = ..., code: Any = ..., type: str = "invalid_request_error") -> dict:
        """Assert an exact OpenAI error envelope with ``status``; return the ``error`` object."""
        assert self.status == status, f"expected {status}, got {self.status}: {self.body[:500]!r}"
        body = self.json()
        assert isinstance(body, dict) and set(body) == {"error"}, f"not an error envelope: {body!r}"
        err = body["error"]
        assert isinstance(err, dict) and set(err) == ERROR_KEYS, f"error keys {sorted(err)} != {sorted(ERROR_KEYS)}"
        assert isinstance(err["message"], str) and err["message"], err
        assert err["type"] == type, err
        assert err["param"] is None or isinstance(err["param"], str), err
        assert err["code"] is None or isinstance(err["code"], str), err
        if param is not ...:
            assert err["param"] == param, f"expected param {param!r}: {err!r}"
        if code is not ...:
            assert err["code"] == code, f"expected code {code!r}: {err!r}"
        return err

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


_NO_AUTH = object()


class Api:
    """A thin client of the app under test; every call returns a :class:`Response`."""

    def __init__(self, client: Any, storage: GatedStorage, settings: Settings) -> None:
        self.client = client
        self.storage = storage
        self.settings = settings

    async def request(
        self,
        method: str,
        path: str | URL,
        *,
        token: Any = TOKEN_A,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Response:
        hdrs = dict(headers or {})
        if token is not None and token is not _NO_AUTH:
            hdrs.setdefault("Authorization", f"Bearer {token}")
        async with self.client.request(method, path, headers=hdrs, **kwargs) as resp:
            body = await resp.read()
            return Response(resp.status, resp.headers, body)

    # ---- files

    async def upload(
        self,
        content: bytes,
        *,
        purpose: str | None = "batch",
        filename: str = "input.jsonl",
        token: Any = TOKEN_A,
        fields: Iterable[tuple[str, str]] = (),
        file_first: bool = False,
        prefix: str = "/v1",
    ) -> Response:
        form = FormData(quote_fields=False)  # raw UTF-8 names, as the SDK (httpx) sends them
        leading = [("purpose", purpose)] if purpose is not None else []
        leading += list(fields)
        if file_first:
            form.add_field("file", content, filename=filename, content_type="application/octet-stream")
        for name, value in leading:
            form.add_field(name, value)
        if not file_first:
            form.add_field("file", content, filename=filename, content_type="application/octet-stream")
        return await self.request("POST", f"{prefix}/files", token=token, data=form)

    async def upload_ok(self, content: bytes | None = None, **kwargs: Any) -> dict:
        return (await self.upload(good_jsonl() if content is None else content, **kwargs)).ok()

    async def list_files(self, token: Any = TOKEN_A, **params: Any) -> Response:
        return await self.request("GET", "/v1/files", token=token, params=params)

    # ---- batches

    async def create_batch(
        self,
        input_file_id: str | None = None,
        *,
        token: Any = TOKEN_A,
        prefix: str = "/v1",
        **extra: Any,
    ) -> Response:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": CHAT, "completion_window": "24h"}
        body.update(extra)
        body = {k: v for k, v in body.items() if v is not _OMIT}
        return await self.request("POST", f"{prefix}/batches", token=token, json=body)

    async def submit(self, content: bytes | None = None, *, token: Any = TOKEN_A, **extra: Any) -> dict:
        """Upload ``content`` (default: 2 good lines) and create a batch on it; return the batch."""
        f = await self.upload_ok(content, token=token)
        return (await self.create_batch(f["id"], token=token, **extra)).ok()

    async def get_batch(self, batch_id: str, token: Any = TOKEN_A) -> dict:
        return (await self.request("GET", f"/v1/batches/{batch_id}", token=token)).ok()

    async def wait_batch(
        self, batch_id: str, *, token: Any = TOKEN_A, leave: str = "validating", timeout: float = 30.0
    ) -> dict:
        """Poll the batch until its status is no longer ``leave``; return it."""

        async def done():
            b = await self.get_batch(batch_id, token=token)
            return b if b["status"] != leave else None

        return await poll(done, timeout=timeout, message=f"batch {batch_id} to leave {leave!r}")

    async def run_batch(self, content: bytes, **extra: Any) -> dict:
        """Submit ``content`` and return the batch once validation is over."""
        batch = await self.submit(content, **extra)
        return await self.wait_batch(batch["id"])

    async def cancel(self, batch_id: str, *, token: Any = TOKEN_A, **kwargs: Any) -> Response:
        return await self.request("POST", f"/v1/batches/{batch_id}/cancel", token=token, **kwargs)


_OMIT = object()
OMIT = _OMIT
NO_AUTH = _NO_AUTH


@pytest.fixture
def make_api(aiohttp_client, tmp_path):
    async def factory(**overrides: Any) -> Api:
        data_dir = tmp_path / "data"
        settings = Settings(**{**DEFAULT_SETTINGS, "data_dir": data_dir, **overrides})
        storage = GatedStorage(data_dir)
        redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        app = create_app(settings, redis=redis, storage=storage)
        client = await aiohttp_client(app)
        return Api(client, storage, settings)

    return factory


@pytest.fixture
async def api(make_api) -> Api:
    return await make_api()
