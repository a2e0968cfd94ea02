"""A fake OpenAI-compatible upstream for tests, the local demo and benchmarks.

Every answer is derived deterministically from the request body (the same body
always yields the same id, text, embedding and token counts), so tests can
predict batch output without a real model.  Faults can be injected globally
(``latency_ms``, ``error_rate``) or per request through extra body fields that
a real provider would ignore:

* ``"mock_status": <int>``: answer with that status and an OpenAI-style error
  body (``code: "mock_error"``; 429 also carries ``Retry-After: 1``).  A value
  of 200 forces success, bypassing the global ``error_rate``.
* ``"mock_fail_times": <int>``: with ``mock_status``, only the first N requests
  carrying this exact body fail; later ones succeed (a transient fault).
* ``"mock_latency_ms": <number>``: sleep this long instead of the global latency.

Provider-side limits let tests check that a client respects them.  They are
decided as soon as a request arrives, before its body is read, before any
latency sleep and before fault injection; a rejected request is answered at once
with 429, an OpenAI-style error body (``type: "rate_limit_error"``) and a
``Retry-After`` header, and it does not count as in flight:

* ``max_concurrency``: a request arriving while that many accepted requests are
  in flight (from arrival, through their latency sleep, until their response
  headers are ready) gets ``code: "concurrency_limit_exceeded"`` and
  ``Retry-After: 1``.
* ``rpm`` with ``window_s`` (default 60): at most
  ``floor(rpm * window_s / 60)`` requests are accepted in any ``window_s``-second
  sliding window (``rpm=120, window_s=2`` allows 4 per 2 s).  A request accepted
  at monotonic time ``t`` occupies the window until ``t + window_s``; a request
  beyond the allowance gets ``code: "rate_limit_exceeded"`` and a
  ``Retry-After`` of the whole seconds (rounded up, at least 1) until the oldest
  accepted request leaves the window.

The concurrency limit is checked first.  Rejections never consume window slots.
With ``retry_after=False`` (``--no-retry-after``) no 429 carries ``Retry-After``
(limit rejections, ``mock_status`` and ``error_rate`` ones alike), like a provider
that never says when to come back.

``GET /_mock/stats`` and ``POST /_mock/reset`` expose counters so tests can
observe what reached the upstream: ``requests`` (every real-time API request,
rejected or not), ``batch_requests`` (Files and Batches API requests),
``accepted`` (those that passed the limits), ``rejected_429`` (limit
rejections only; ``mock_status`` and ``error_rate`` 429s appear only in
``by_status``), ``in_flight`` and its peak ``max_in_flight``, ``by_status``,
``authorization`` values, ``paths``, and ``first_request_at`` /
``last_request_at`` (``time.time()`` of the first and last accepted request, or
null) for throughput.  A reset zeroes the counters and empties the rate window;
requests still in flight stay counted in ``in_flight``.

It also has a Files and Batches API of its own, kept in memory, so that Sluice can
delegate batches to it (``batch_api = "delegate"``): ``POST/GET /v1/files``,
``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST/GET
/v1/batches``, ``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``,
shaped like OpenAI's (list pages newest first with ``after``/``limit``/``has_more``,
``metadata`` echoed, 409 for cancelling a finished batch). A batch is validated
after ``batch_start_ms``, then its lines are answered one after the other, each
taking ``batch_line_ms`` (or its body's ``mock_latency_ms``) and answered as the
real-time endpoint would (``mock_status`` included: such lines go to the error
file); ``request_counts`` move as lines are answered. A cancelled batch becomes
``cancelled`` ``batch_cancel_ms`` later with the lines answered so far (unrun lines
get no line, so the caller must account for them); a batch still running after
``batch_window_ms`` expires, its unrun lines getting ``batch_expired`` lines in the
error file. Markers in a line's body drive the rest (the first line carrying one
decides):

* ``"mock_batch_fail": "<message>"``: the batch fails at validation with that message.
* ``"mock_batch_expire": true``: the batch expires when processing reaches this line.
* ``"mock_upload_delay_ms"``: the upload of a file holding this line is answered this
  much later (the file exists already), like a slow upload.
* ``"mock_create_delay_ms"``: creating a batch from such a file is answered this much
  later (the batch exists already and runs).
* ``"mock_content_delay_ms"``: that batch's output and error files are served in ten
  pieces, this long apart, like a slow download.

Run standalone with ``sluice mock-provider --port 8001`` (add ``--max-concurrency``,
``--rpm`` and ``--window-s`` to enforce limits, ``--batch-*`` for the Batch API).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import secrets
import signal
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

__all__ = ["create_app", "run", "serve"]

_EMBEDDING_DIMS = 8
_BASE_CREATED = 1_700_000_000

# An answer before serialisation: status, JSON-able body, extra headers.
_Answer = tuple[int, Any, dict[str, str]]
_Builder = Callable[[dict[str, Any], str], Any]


# ----------------------------------------------------------------------------- helpers
def _as_text(value: Any) -> str:
    """Flatten any JSON value to a string so structured content still echoes deterministically."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return msgspec.json.encode(value).decode()


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


def _created(digest: str) -> int:
    # Varies per body but is stable, so ids and timestamps both repeat for repeated requests.
    return _BASE_CREATED + int(digest[:8], 16) % 1_000_000


def _error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    if status == 401:
        return "authentication_error"
    return "invalid_request_error"


def _bad_request(message: str, param: str | None = None) -> _Answer:
    return 400, _error_body(message, type="invalid_request_error", param=param, code=None), {}


def _fault(status: int, message: str, code: str) -> _Answer:
    headers = {"Retry-After": "1"} if status == 429 else {}
    return status, _error_body(message, type=_error_type(status), code=code), headers


def _is_number(value: Any) -> bool:
    # bool is an int subclass; ``"mock_latency_ms": true`` is a caller bug, not 1 ms.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- answers
def _chat_completion(body: dict[str, Any], digest: str) -> dict[str, Any]:
    messages = body.get("messages")
    prompt = ""
    if isinstance(messages, list) and messages:
        last = messages[-1]
        prompt = _as_text(last.get("content") if isinstance(last, dict) else last)
    text = "echo: " + prompt
    prompt_tokens, completion_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": f"chatcmpl-{digest[:16]}",
        "object": "chat.completion",
        "created": _created(digest),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def _completion(body: dict[str, Any], digest: str) -> dict[str, Any]:
    prompt_value = body.get("prompt")
    if isinstance(prompt_value, list) and all(isinstance(p, str) for p in prompt_value):
        prompt = "\n".join(prompt_value)
    else:
        prompt = _as_text(prompt_value)
    text = "echo: " + prompt
    prompt_tokens, completion_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": f"cmpl-{digest[:16]}",
        "object": "text_completion",
        "created": _created(digest),
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def _embedding_inputs(value: Any) -> list[Any]:
    if isinstance(value, list):
        # As in the OpenAI API, a flat list of token ids is one input, not many.
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        return list(value)
    return [value]


def _embedding_vector(item: Any) -> list[float]:
    raw = item.encode() if isinstance(item, str) else msgspec.json.encode(item)
    digest = hashlib.sha256(raw).digest()
    words = struct.unpack(f">{_EMBEDDING_DIMS}I", digest[: 4 * _EMBEDDING_DIMS])
    # Round-trip through float32 so the float and base64 encodings carry identical values.
    vector = [w / 2**31 - 1.0 for w in words]
    return list(struct.unpack(f"<{_EMBEDDING_DIMS}f", struct.pack(f"<{_EMBEDDING_DIMS}f", *vector)))


def _embeddings(body: dict[str, Any], digest: str) -> dict[str, Any]:
    items = _embedding_inputs(body.get("input"))
    # The openai SDK asks for base64 by default and decodes it client-side.
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = _embedding_vector(item)
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt_tokens = sum(len(i) if isinstance(i, list) else _tokens(_as_text(i)) for i in items)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _content_text(content: Any) -> str:
    # Responses input content is either a string or a list of typed parts with "text".
    if isinstance(content, list) and content and all(isinstance(p, dict) and "text" in p for p in content):
        return "".join(_as_text(p["text"]) for p in content)
    return _as_text(content)


def _response(body: dict[str, Any], digest: str) -> dict[str, Any]:
    value = body.get("input")
    if isinstance(value, list):
        last = value[-1] if value else None
        prompt = _content_text(last.get("content") if isinstance(last, dict) else last)
    else:
        prompt = _as_text(value)
    text = "echo: " + prompt
    input_tokens, output_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": f"resp_{digest[:16]}",
        "object": "response",
        "created_at": _created(digest),
        "status": "completed",
        "model": body["model"],
        "output": [
            {
                "type": "message",
                "id": f"msg_{digest[16:32]}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "error": None,
        "incomplete_details": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _moderation(body: dict[str, Any], digest: str) -> dict[str, Any]:
    value = body.get("input")
    count = len(value) if isinstance(value, list) and value else 1
    return {
        "id": f"modr-{digest[:16]}",
        "model": body["model"],
        "results": [{"flagged": False, "categories": {}, "category_scores": {}} for _ in range(count)],
    }


_ENDPOINTS: dict[str, _Builder] = {
    "/v1/chat/completions": _chat_completion,
    "/v1/completions": _completion,
    "/v1/embeddings": _embeddings,
    "/v1/responses": _response,
    "/v1/moderations": _moderation,
}


# ----------------------------------------------------------------------------- server
def _window_allowance(rpm: int, window_s: float) -> int:
    # The epsilon stops float rounding from costing a request (200 * 5.1 / 60 is 16.99...98).
    return math.floor(rpm * window_s / 60 + 1e-9)


class _MockProvider:
    """Holds the fault and limit settings and the counters behind /_mock/stats."""

    def __init__(
        self,
        latency_ms: float,
        error_rate: float,
        seed: int | None,
        max_concurrency: int | None = None,
        rpm: int | None = None,
        window_s: float = 60.0,
        retry_after: bool = True,
    ) -> None:
        self.latency_ms = latency_ms
        self.retry_after = retry_after
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.max_concurrency = max_concurrency
        self.window_s = window_s
        self.window_allowance = None if rpm is None else _window_allowance(rpm, window_s)
        # Monotonic arrival times of the accepted requests still inside the rpm window.
        self.window: deque[float] = deque()
        self.in_flight = 0
        self._zero()

    def _zero(self) -> None:
        self.failed_bodies: Counter[bytes] = Counter()
        self.requests = 0
        self.batch_requests = 0
        self.accepted = 0
        self.rejected_429 = 0
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.window.clear()
        self.max_in_flight = self.in_flight
        self.by_status: Counter[str] = Counter()
        self.authorization: set[str] = set()
        self.paths: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batch_requests": self.batch_requests,
            "accepted": self.accepted,
            "rejected_429": self.rejected_429,
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_status": dict(self.by_status),
            "authorization": sorted(self.authorization),
            "paths": dict(self.paths),
        }

    def _admit(self) -> _Answer | None:
        """Accept the request (recording it) or return the 429 that rejects it."""
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            message = f"Too many concurrent requests (limit {self.max_concurrency}); retry after 1 second."
            return (
                429,
                _error_body(message, type="rate_limit_error", code="concurrency_limit_exceeded"),
                {"Retry-After": "1"},
            )
        now = time.monotonic()
        if self.window_allowance is not None:
            horizon = now - self.window_s
            while self.window and self.window[0] <= horizon:
                self.window.popleft()
            if len(self.window) >= self.window_allowance:
                retry_after = max(1, math.ceil(self.window[0] + self.window_s - now))
                message = (
                    f"Rate limit reached for requests: limit {self.window_allowance} per {self.window_s:g}s; "
                    f"retry after {retry_after} seconds."
                )
                return (
                    429,
                    _error_body(message, type="rate_limit_error", code="rate_limit_exceeded"),
                    {"Retry-After": str(retry_after)},
                )
            self.window.append(now)
        self.accepted += 1
        wall = time.time()
        if self.first_request_at is None:
            self.first_request_at = wall
        self.last_request_at = wall
        return None

    async def _respond(self, request: web.Request, answer: _Answer) -> web.StreamResponse:
        status, payload, headers = answer
        if not self.retry_after:
            headers = {k: v for k, v in headers.items() if k.lower() != "retry-after"}
        self.by_status[str(status)] += 1
        response = web.Response(
            status=status,
            body=msgspec.json.encode(payload),
            content_type="application/json",
            headers=headers,
        )
        response.headers["x-request-id"] = f"req_{uuid.uuid4().hex}"
        await response.prepare(request)
        return response

    def handler(self, build: _Builder) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            self.paths[request.path] += 1
            auth = request.headers.get("Authorization")
            if auth is not None:
                self.authorization.add(auth)
            rejection = self._admit()
            if rejection is not None:
                self.rejected_429 += 1
                return await self._respond(request, rejection)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                answer = await self._answer(request, build)
                # Count the request as in flight until its headers are ready, as the spec
                # for /_mock/stats promises; aiohttp then sends the body after we return.
                return await self._respond(request, answer)
            finally:
                self.in_flight -= 1

        return handle

    async def _answer(self, request: web.Request, build: _Builder) -> _Answer:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = None

        latency_ms: Any = self.latency_ms
        if isinstance(body, dict) and "mock_latency_ms" in body:
            latency_ms = body["mock_latency_ms"]
            if not _is_number(latency_ms) or latency_ms < 0:
                return _bad_request("mock_latency_ms must be a non-negative number", "mock_latency_ms")
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)

        if not isinstance(body, dict):
            return _bad_request("The request body must be a JSON object.")

        forced = body.get("mock_status")
        if forced is not None:
            if not isinstance(forced, int) or isinstance(forced, bool) or not (forced == 200 or 400 <= forced <= 599):
                return _bad_request("mock_status must be 200 or an integer in 400..599", "mock_status")

        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", "model")

        fail_times = body.get("mock_fail_times")
        if fail_times is not None and (
            not isinstance(fail_times, int) or isinstance(fail_times, bool) or fail_times < 0
        ):
            return _bad_request("mock_fail_times must be a non-negative integer", "mock_fail_times")
        if forced is not None and forced != 200:
            # With mock_fail_times, only the first N deliveries of this exact body fail: a transient fault.
            seen = self.failed_bodies[hashlib.sha256(raw).digest()]
            if fail_times is None or seen < fail_times:
                self.failed_bodies[hashlib.sha256(raw).digest()] = seen + 1
                return _fault(forced, f"mock_status {forced} requested", "mock_error")
        if forced is None and self.error_rate > 0:
            # One draw per request keeps the fault sequence reproducible for a given seed.
            draw = self.rng.random()
            if draw < self.error_rate / 2:
                return _fault(429, "Rate limit reached (injected by mock provider)", "rate_limit_exceeded")
            if draw < self.error_rate:
                return _fault(500, "The server had an error (injected by mock provider)", "mock_error")

        digest = hashlib.sha256(raw).hexdigest()
        return 200, build(body, digest), {}

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=lambda o: msgspec.json.encode(o).decode())

    async def reset_handler(self, request: web.Request) -> web.Response:
        self._zero()
        return await self.stats_handler(request)


# ----------------------------------------------------------------------------- Files and Batches API
_BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class _InputLine(msgspec.Struct):
    custom_id: Any = None
    body: msgspec.Raw = msgspec.Raw(b"null")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json", headers=headers
    )


def _not_found(kind: str, object_id: str) -> web.Response:
    return _json(_error_body(f"No such {kind}: '{object_id}'", type="invalid_request_error", code=None), 404)


def _invalid(message: str, param: str | None = None) -> web.Response:
    status, payload, _ = _bad_request(message, param)
    return _json(payload, status)


def _page(items: list[dict[str, Any]], request: web.Request, default_limit: int, max_limit: int) -> web.Response:
    try:
        limit = int(request.query.get("limit", default_limit))
    except ValueError:
        return _invalid("limit must be an integer", "limit")
    if not 1 <= limit <= max_limit:
        return _invalid(f"limit must be between 1 and {max_limit}", "limit")
    after = request.query.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(items) > limit,
        }
    )


def _marker(lines: list[tuple[Any, bytes]], name: str) -> Any:
    """The value of the first line body carrying ``name`` (see the module docstring), or None."""
    for _, raw in lines:
        if name.encode() in raw:
            body = msgspec.json.decode(raw)
            if isinstance(body, dict) and name in body:
                return body[name]
    return None


def _delay_s(value: Any) -> float:
    return value / 1000 if _is_number(value) and value > 0 else 0.0


class _BatchAPI:
    """The mock's own Files and Batches API, in memory (see the module docstring)."""

    def __init__(
        self, provider: _MockProvider, *, line_ms: float, start_ms: float, cancel_ms: float, window_ms: float | None
    ) -> None:
        self.provider = provider
        self.line_ms = line_ms
        self.start_ms = start_ms
        self.cancel_ms = cancel_ms
        self.window_ms = window_ms
        self.files: dict[str, dict[str, Any]] = {}  # id -> file object
        self.contents: dict[str, bytes] = {}
        self.slow: dict[str, float] = {}  # file id -> seconds between the pieces of its content
        self.batches: dict[str, dict[str, Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.seq = 0

    def _id(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq:06d}{secrets.token_hex(6)}"

    def counted(self, handle: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable:
        async def counting(request: web.Request) -> web.StreamResponse:
            self.provider.batch_requests += 1
            self.provider.paths[request.path] += 1
            auth = request.headers.get("Authorization")
            if auth is not None:
                self.provider.authorization.add(auth)
            response = await handle(request)
            if not response.prepared:  # file content streams, its headers already sent
                response.headers["x-request-id"] = f"req_{uuid.uuid4().hex}"
            return response

        return counting

    # ---- files
    def _store_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = self._id("file-mock")
        created = int(time.time())
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": created,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": created + 30 * 86400,
            "status_details": None,
        }
        self.contents[file_id] = content
        return self.files[file_id]

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/form-data"):
            return _invalid("Uploads must be multipart/form-data.")
        purpose, content, filename = None, None, "upload"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                return _invalid("Nested multipart bodies are not supported.")
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = getattr(part, "filename", None) or filename
                content = bytes(await part.read())
        if not purpose or content is None:
            return _invalid("'file' and 'purpose' are required.", "file" if content is None else "purpose")
        lines = self._lines(content) if purpose == "batch" else []
        if purpose == "batch" and lines is None:
            return _invalid("Invalid file format for Batch API. Must be .jsonl", "file")
        stored = self._store_file(filename, purpose, content)
        await asyncio.sleep(_delay_s(_marker(lines or [], "mock_upload_delay_ms")))
        return _json(stored)

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        items = [f for f in self.files.values() if request.query.get("purpose") in (None, f["purpose"])]
        if request.query.get("order", "desc") == "desc":
            items.reverse()
        return _page(items, request, 10000, 10000)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return _not_found("File", file_id)
        return _json(self.files[file_id])

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return _not_found("File", file_id)
        self.contents.pop(file_id, None)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return _not_found("File", file_id)
        data = self.contents[file_id]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        pause = self.slow.get(file_id, 0.0)
        if pause:
            lines = data.splitlines(keepends=True)
            step = max(1, math.ceil(len(lines) / 10))
            for i in range(0, len(lines), step):
                await response.write(b"".join(lines[i : i + step]))
                await asyncio.sleep(pause)
        else:
            await response.write(data)
        await response.write_eof()
        return response

    # ---- batches
    @staticmethod
    def _lines(content: bytes) -> list[tuple[Any, bytes]] | None:
        out = []
        for raw in content.splitlines():
            if raw.strip():
                try:
                    line = msgspec.json.decode(raw, type=_InputLine)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    return None
                out.append((line.custom_id, bytes(line.body)))
        return out

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return _invalid("The request body must be a JSON object.")
        if not isinstance(body, dict):
            return _invalid("The request body must be a JSON object.")
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if file_id not in self.files or self.files[file_id]["purpose"] != "batch":
            return _invalid(f"Cannot find batch input file {file_id!r}.", "input_file_id")
        if endpoint not in _ENDPOINTS:
            return _invalid(f"Invalid value: {endpoint!r}.", "endpoint")
        if body.get("completion_window") != "24h":
            return _invalid("completion_window must be '24h'.", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            return _invalid("metadata must map strings to strings.", "metadata")
        created = int(time.time())
        batch: dict[str, Any] = {
            "id": self._id("batch_mock"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "model": None,
            "usage": None,
        }
        self.batches[batch["id"]] = batch
        lines = self._lines(self.contents[file_id]) or []
        task = asyncio.create_task(self._run(batch, lines))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        await asyncio.sleep(_delay_s(_marker(lines, "mock_create_delay_ms")))
        return _json(batch)

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        return _page(list(reversed(self.batches.values())), request, 20, 100)

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return _not_found("Batch", batch_id)
        return _json(self.batches[batch_id])

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        batch = self.batches.get(batch_id)
        if batch is None:
            return _not_found("Batch", batch_id)
        if batch["status"] in _BATCH_TERMINAL:
            return _json(
                _error_body(f"Cannot cancel a batch with status '{batch['status']}'.", type="invalid_request_error"),
                409,
                {"x-should-retry": "false"},
            )
        if batch["status"] != "cancelling":
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return _json(batch)

    async def _run(self, batch: dict[str, Any], lines: list[tuple[Any, bytes]]) -> None:
        build = _ENDPOINTS[batch["endpoint"]]
        started = time.monotonic()
        await asyncio.sleep(self.start_ms / 1000)
        failure = _marker(lines, "mock_batch_fail")
        if batch["status"] == "validating" and failure is not None:
            batch.update(
                status="failed",
                failed_at=int(time.time()),
                errors={
                    "object": "list",
                    "data": [{"code": "mock_batch_failed", "message": str(failure), "param": None, "line": None}],
                },
            )
            return
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(lines)
        models = [msgspec.json.decode(raw).get("model") for _, raw in lines[:1]]
        batch["model"] = models[0] if models and isinstance(models[0], str) else None
        out: list[bytes] = []
        err: list[bytes] = []
        ended = "completed"
        done = 0
        for custom_id, raw in lines:
            if batch["status"] == "cancelling":
                ended = "cancelled"
                break
            body = msgspec.json.decode(raw)
            if (isinstance(body, dict) and body.get("mock_batch_expire") is True) or (
                self.window_ms is not None and (time.monotonic() - started) * 1000 >= self.window_ms
            ):
                ended = "expired"
                break
            wait = (
                _delay_s(body.get("mock_latency_ms"))
                if isinstance(body, dict) and "mock_latency_ms" in body
                else self.line_ms / 1000
            )
            if wait:
                await asyncio.sleep(wait)
            elif done % 500 == 0:
                await asyncio.sleep(0)
            status, payload = _batch_answer(raw, build)
            result = {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": payload},
                "error": None,
            }
            (out if status == 200 else err).append(msgspec.json.encode(result))
            batch["request_counts"]["completed" if status == 200 else "failed"] += 1
            done += 1
        else:
            if batch["status"] == "cancelling":
                ended = "cancelled"
        if ended == "expired":
            for custom_id, _ in lines[done:]:
                err.append(
                    msgspec.json.encode(
                        {
                            "id": f"batch_req_{secrets.token_hex(12)}",
                            "custom_id": custom_id,
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the completion window expired.",
                            },
                        }
                    )
                )
        if ended == "cancelled":
            await asyncio.sleep(self.cancel_ms / 1000)
        elif ended == "completed":
            batch.update(status="finalizing", finalizing_at=int(time.time()))
        pause = _delay_s(_marker(lines, "mock_content_delay_ms"))
        for field, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                stored = self._store_file(
                    f"{batch['id']}_{field.split('_')[0]}.jsonl", "batch_output", b"\n".join(rows) + b"\n"
                )
                batch[field] = stored["id"]
                if pause:
                    self.slow[stored["id"]] = pause
        batch.update(status=ended, **{f"{ended}_at": int(time.time())})

    async def aclose(self, app: web.Application) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            for method, path, handle in (
                ("POST", "/files", self.upload),
                ("GET", "/files", self.list_files),
                ("GET", "/files/{file_id}", self.get_file),
                ("DELETE", "/files/{file_id}", self.delete_file),
                ("GET", "/files/{file_id}/content", self.content),
                ("POST", "/batches", self.create),
                ("GET", "/batches", self.list_batches),
                ("GET", "/batches/{batch_id}", self.get_batch),
                ("POST", "/batches/{batch_id}/cancel", self.cancel),
            ):
                app.router.add_route(method, prefix + path, self.counted(handle))
        app.on_cleanup.append(self.aclose)


def _batch_answer(raw: bytes, build: _Builder) -> tuple[int, Any]:
    """What the real-time endpoint would answer to this body (``mock_status`` included), latency aside."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        return 400, _error_body("The request body must be a JSON object.", type="invalid_request_error")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return 400, _error_body("you must provide a model parameter", type="invalid_request_error", param="model")
    forced = body.get("mock_status")
    if isinstance(forced, int) and not isinstance(forced, bool) and 400 <= forced <= 599:
        return forced, _fault(forced, f"mock_status {forced} requested", "mock_error")[1]
    return 200, build(body, hashlib.sha256(raw).hexdigest())


def create_app(
    *,
    latency_ms: float = 0.0,
    error_rate: float = 0.0,
    seed: int | None = None,
    max_concurrency: int | None = None,
    rpm: int | None = None,
    window_s: float = 60.0,
    batch_line_ms: float = 0.0,
    batch_start_ms: float = 0.0,
    batch_cancel_ms: float = 0.0,
    batch_window_ms: float | None = None,
    retry_after: bool = True,
) -> web.Application:
    """Build the mock provider application.

    ``latency_ms`` delays every API answer (concurrently, via ``asyncio.sleep``);
    ``error_rate`` is the probability that an API request fails, half of the
    failures as 429 with ``Retry-After: 1`` and half as 500, drawn from
    ``random.Random(seed)``.  ``max_concurrency`` caps the requests in flight and
    ``rpm`` caps accepted requests to ``floor(rpm * window_s / 60)`` per sliding
    ``window_s`` seconds; requests beyond either limit get an immediate 429 (see
    the module docstring).  ``None`` disables a limit.  Raises ``ValueError`` for
    out-of-range settings, including an ``rpm``/``window_s`` pair that would
    allow no request at all.  ``batch_line_ms``, ``batch_start_ms``,
    ``batch_cancel_ms`` and ``batch_window_ms`` pace its Batch API (see the
    module docstring).  ``retry_after=False`` leaves ``Retry-After`` off every 429.
    """
    if latency_ms < 0:
        raise ValueError("latency_ms must be >= 0")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError("error_rate must be within [0, 1]")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if not window_s > 0:
        raise ValueError("window_s must be > 0")
    if rpm is not None:
        if rpm < 1:
            raise ValueError("rpm must be >= 1")
        if _window_allowance(rpm, window_s) < 1:
            raise ValueError("rpm * window_s / 60 must be >= 1 (at least one request per window)")
    if min(batch_line_ms, batch_start_ms, batch_cancel_ms) < 0 or (batch_window_ms is not None and batch_window_ms < 0):
        raise ValueError("batch_* times must be >= 0")
    provider = _MockProvider(latency_ms, error_rate, seed, max_concurrency, rpm, window_s, retry_after)
    app = web.Application(client_max_size=512 * 1024 * 1024)
    _BatchAPI(
        provider, line_ms=batch_line_ms, start_ms=batch_start_ms, cancel_ms=batch_cancel_ms, window_ms=batch_window_ms
    ).add_routes(app)
    for path, build in _ENDPOINTS.items():
        handle = provider.handler(build)
        app.router.add_post(path, handle)
        app.router.add_post(path.removeprefix("/v1"), handle)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/_mock/stats", provider.stats_handler)
        app.router.add_route(method, "/_mock/reset", provider.reset_handler)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; print the listening line once the socket accepts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, shutdown_timeout=2.0, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        # With port 0 the OS picks the port; report the real one so callers can connect.
        bound_port = runner.addresses[0][1] if runner.addresses else port
        print(f"mock provider listening on http://{host}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(
    port: int,
    *,
    host: str = "127.0.0.1",
    latency_ms: float = 0.0,
    error_rate: float = 0.0,
    seed: int | None = None,
    max_concurrency: int | None = None,
    rpm: int | None = None,
    window_s: float = 60.0,
    batch_line_ms: float = 0.0,
    batch_start_ms: float = 0.0,
    batch_cancel_ms: float = 0.0,
    batch_window_ms: float | None = None,
    retry_after: bool = True,
) -> None:
    """Serve the mock provider on ``host:port`` until SIGINT or SIGTERM, then return.

    Prints ``mock provider listening on http://host:port`` (with the bound port
    when ``port`` is 0) once the socket is accepting connections.  The settings
    are those of :func:`create_app`.
    """
    app = create_app(
        latency_ms=latency_ms,
        error_rate=error_rate,
        seed=seed,
        max_concurrency=max_concurrency,
        rpm=rpm,
        window_s=window_s,
        batch_line_ms=batch_line_ms,
        batch_start_ms=batch_start_ms,
        batch_cancel_ms=batch_cancel_ms,
        batch_window_ms=batch_window_ms,
        retry_after=retry_after,
    )
    asyncio.run(serve(app, host, port))
