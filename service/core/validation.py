"""Reading JSONL from storage and validating batch request lines (contract §5).

Codes follow what OpenAI returns where it is known; the rest are documented in docs/api.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncGenerator

import msgspec

from .storage import Storage
from .wire import JSON_ERRORS, BatchError, InputBody, InputLine

# Longest accepted line; a longer one is reported, never buffered whole.
MAX_LINE_BYTES = 32 * 1024 * 1024
BOM = b"\xef\xbb\xbf"

_line_decoder = msgspec.json.Decoder(InputLine)
_body_decoder = msgspec.json.Decoder(InputBody)


@dataclass(frozen=True)
class Line:
    """A non-blank line of a JSONL file.

    ``number`` is its 1-based line number (counted from ``start`` when reading from an offset),
    ``data`` its bytes (None if too long) and ``end`` the byte offset just past it, where a later
    read can resume.
    """

    number: int
    data: bytes | None
    end: int = 0


async def iter_lines(
    storage: Storage, key: str, *, max_line: int = MAX_LINE_BYTES, start: int = 0,
) -> AsyncGenerator[Line, None]:
    """Yield the non-blank lines of a stored file, tolerating a BOM, CRLF and a missing final newline.

    A line longer than ``max_line`` is yielded with ``data=None`` and skipped without being held.
    ``start`` is a byte offset to resume from; it must be 0 or a previous line's ``end``.
    """
    buf = bytearray()
    number = 1
    skipping = False
    pos = start  # absolute offset of the chunk being scanned
    async for chunk in storage.read(key, offset=start):
        if pos == 0 and chunk.startswith(BOM):
            chunk = chunk[len(BOM):]
            pos = len(BOM)
        begin = 0
        while True:
            nl = chunk.find(b"\n", begin)
            if nl < 0:
                if not skipping:
                    buf += chunk[begin:]
                    if len(buf) > max_line:
                        buf.clear()
                        skipping = True
                break
            end = pos + nl + 1
            if skipping:
                skipping = False
                yield Line(number, None, end)
            else:
                buf += chunk[begin:nl]
                if len(buf) > max_line:
                    yield Line(number, None, end)
                elif buf.strip():
                    yield Line(number, bytes(buf).rstrip(b"\r"), end)
            buf.clear()
            number += 1
            begin = nl + 1
        pos += len(chunk)
    if skipping:
        yield Line(number, None, pos)
    elif buf.strip():
        yield Line(number, bytes(buf).rstrip(b"\r"), pos)


@dataclass(frozen=True)
class Request:
    """A valid request line, as workers need it."""

    custom_id: str
    body: bytes
    model: str
    cost: int  # estimated tokens, for providers with a tokens-per-minute limit


def _err(code: str, message: str, param: str | None, line: int | None) -> BatchError:
    return BatchError(code=code, message=message, param=param, line=line)


def check_line(line: Line, endpoint: str) -> Request | BatchError:
    """Validate one line against the batch endpoint (custom_id uniqueness is the caller's)."""
    n = line.number
    if line.data is None:
        return _err("line_too_long", f"This line is longer than {MAX_LINE_BYTES} bytes.", None, n)
    try:
        # The body is kept raw and forwarded as is: the whole line must be valid UTF-8.
        line.data.decode()
        parsed = _line_decoder.decode(line.data)
    except JSON_ERRORS:
        return _err("invalid_json_line", "This line is not parseable as a valid JSON object.", None, n)
    for name in ("custom_id", "method", "url", "body"):
        if getattr(parsed, name) is msgspec.UNSET:
            return _err("missing_required_parameter", f"Missing required parameter: '{name}'.", name, n)
    if not isinstance(parsed.custom_id, str) or not parsed.custom_id:
        return _err("invalid_type", "'custom_id' must be a non-empty string.", "custom_id", n)
    if parsed.method != "POST":
        return _err("invalid_method", "Only the POST method is supported in the Batch API.", "method", n)
    if parsed.url != endpoint:
        return _err("invalid_url", "The URL provided for this request does not match the batch endpoint.", "url", n)
    assert not isinstance(parsed.body, msgspec.UnsetType)  # the loop above answered a missing one
    raw = bytes(parsed.body)
    try:
        body = _body_decoder.decode(raw)
    except JSON_ERRORS:
        return _err("invalid_type", "'body' must be a JSON object.", "body", n)
    if body.model is msgspec.UNSET or body.model is None:
        return _err("invalid_request", "Model parameter is required.", "body.model", n)
    if not isinstance(body.model, str) or not body.model:
        return _err("invalid_request", "Model parameter must be a non-empty string.", "body.model", n)
    if body.stream is True:
        return _err("streaming_unsupported", "Streaming is not supported in the Batch API.", "body.stream", n)
    max_tokens = next((v for v in (body.max_tokens, body.max_completion_tokens, body.max_output_tokens)
                       if isinstance(v, int) and not isinstance(v, bool)), 0)
    return Request(custom_id=parsed.custom_id, body=raw, model=body.model,
                   cost=estimate_tokens(len(raw), max_tokens))


def estimate_tokens(body_len: int, max_tokens: int) -> int:
    """Rough token cost of a request: about 4 bytes of prompt per token, plus the output cap."""
    return body_len // 4 + 1 + max(0, max_tokens)


def model_error(model: str, line: int) -> BatchError:
    """The error for a model that no configured provider serves."""
    return _err("model_not_found", f"The provided model '{model[:200]}' is not served by any provider.",
                "body.model", line)


def duplicate_error(line: int) -> BatchError:
    """The error for a custom_id already used by an earlier line."""
    return _err("duplicate_custom_id", "The custom_id for this request is a duplicate of another request.", "custom_id", line)


def too_many_error(limit: int) -> BatchError:
    """The error for a file with more request lines than a batch may hold."""
    return _err("too_many_tasks", f"The batch input file has more than {limit} requests.", None, None)


def empty_error() -> BatchError:
    """The error for a file without a single request line."""
    return _err("empty_file", "The batch input file is empty.", None, None)
