"""Reading JSONL from storage and validating batch request lines (contract §5).

Codes follow what OpenAI returns where it is known; the rest are documented in docs/api.md.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from array import array
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Iterator

import msgspec

from .storage import CHUNK, Storage
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


@dataclass(frozen=True)
class Block:
    """Whole lines of a stored file, as :func:`iter_blocks` reads them.

    ``data`` holds consecutive lines starting with line ``number`` at byte ``offset``, each
    ending with a newline except the file's last; ``end`` is the byte offset just past them.
    ``data`` is None for one line longer than the limit, which was skipped without being held.
    """

    number: int
    offset: int
    data: bytes | None
    end: int

    def lines(self, max_line: int = MAX_LINE_BYTES) -> Iterator[Line]:
        """The non-blank lines of the block, as :func:`iter_lines` yields them."""
        if self.data is None:
            yield Line(self.number, None, self.end)
            return
        number, offset, end = self.number, self.offset, self.end
        check_length = len(self.data) > max_line
        for raw in split_lines(self.data):
            offset += len(raw) + 1
            if check_length and len(raw) > max_line:
                yield Line(number, None, min(offset, end))
            elif raw.strip():
                yield Line(number, raw.rstrip(b"\r"), min(offset, end))
            number += 1


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a block's ``data``, without their newlines (CRs are kept)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return lines


async def _read_ahead(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """The items of ``chunks``, each next one read while the caller works on the current one."""
    pending: asyncio.Future[bytes] | None = None
    try:
        pending = asyncio.ensure_future(chunks.__anext__())
        while True:
            try:
                chunk = await pending
            except StopAsyncIteration:
                pending = None
                return
            pending = asyncio.ensure_future(chunks.__anext__())
            await asyncio.sleep(0)  # lets the read start (for local files: hand it to a thread)
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await chunks.aclose()


async def iter_blocks(
    storage: Storage,
    key: str,
    *,
    max_line: int = MAX_LINE_BYTES,
    start: int = 0,
    chunk_size: int = CHUNK,
    read_ahead: bool = False,
) -> AsyncGenerator[Block, None]:
    """Yield a stored file as blocks of whole lines, one per read of ``chunk_size``, tolerating a BOM.

    A line longer than ``max_line`` that spans reads is yielded as a block of its own with
    ``data=None`` and skipped without being held; one within a block is the reader's to spot
    (:meth:`Block.lines`). ``start`` is a byte offset to resume from: 0 or a line's ``end``.
    ``read_ahead``: read the next chunk while the caller works on a block (one more chunk held).
    """
    reads = storage.read(key, chunk_size, offset=start)
    chunks = _read_ahead(reads) if read_ahead else reads
    parts: list[bytes] = []  # the line read so far, when it spans reads
    held = 0
    line_start = pos = start  # pos: absolute offset of the chunk being scanned
    number = 1
    skipping = False
    async for chunk in chunks:
        if pos == 0 and chunk.startswith(BOM):
            chunk = chunk[len(BOM) :]
            pos = line_start = len(BOM)
        last = chunk.rfind(b"\n")
        begin = 0
        if last >= 0:
            if skipping:
                begin = chunk.find(b"\n") + 1
                skipping = False
                yield Block(number, line_start, None, pos + begin)
                number += 1
                line_start = pos + begin
            if last + 1 > begin:
                data = chunk[begin : last + 1]
                if parts:
                    data = b"".join((*parts, data))
                    parts.clear()
                    held = 0
                yield Block(number, line_start, data, pos + last + 1)
                number += data.count(b"\n")
                line_start = pos + last + 1
            begin = last + 1
        if not skipping and begin < len(chunk):
            parts.append(chunk[begin:] if begin else chunk)
            held += len(chunk) - begin
            if held > max_line:
                parts.clear()
                held = 0
                skipping = True
        pos += len(chunk)
    if skipping:
        yield Block(number, line_start, None, pos)
    elif parts:
        yield Block(number, line_start, b"".join(parts), pos)


async def iter_lines(
    storage: Storage,
    key: str,
    *,
    max_line: int = MAX_LINE_BYTES,
    start: int = 0,
) -> AsyncGenerator[Line, None]:
    """Yield the non-blank lines of a stored file, tolerating a BOM, CRLF and a missing final newline.

    A line longer than ``max_line`` is yielded with ``data=None`` and skipped without being held.
    ``start`` is a byte offset to resume from; it must be 0 or a previous line's ``end``.
    """
    async for block in iter_blocks(storage, key, max_line=max_line, start=start):
        for line in block.lines(max_line):
            yield line


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
    max_tokens = next(
        (
            v
            for v in (body.max_tokens, body.max_completion_tokens, body.max_output_tokens)
            if isinstance(v, int) and not isinstance(v, bool)
        ),
        0,
    )
    return Request(custom_id=parsed.custom_id, body=raw, model=body.model, cost=estimate_tokens(len(raw), max_tokens))


class _QuickBody(msgspec.Struct):
    # InputBody with the types a valid line has: what decodes here passes check_line's body checks
    # but ``stream`` and an empty model, which quick_check looks at.
    model: str
    stream: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


class _QuickLine(msgspec.Struct):
    # InputLine with the types a valid line has, its body decoded in the same pass.
    custom_id: str
    method: str
    url: str
    body: _QuickBody


_quick_decoder = msgspec.json.Decoder(_QuickLine)


def quick_check(data: bytes, endpoint: str) -> tuple[str, str] | None:
    """``(custom_id, model)`` of a line that :func:`check_line` would accept; None: ask it.

    One decode and no allocation beyond the two strings, for the common case of a valid line.
    The caller must know ``data`` is valid UTF-8 (say, a whole block was checked at once), and
    that the line is not too long; a blank line, a bad line or an unusual valid one gives None.
    """
    try:
        parsed = _quick_decoder.decode(data)
    except JSON_ERRORS:
        return None
    body = parsed.body
    if (
        parsed.method != "POST"
        or parsed.url != endpoint
        or not parsed.custom_id
        or not body.model
        or body.stream is True
    ):
        return None
    return parsed.custom_id, body.model


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 (as every line must be: its body is forwarded as is)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


_HASH_MASK = (1 << 64) - 1


def id_hash(custom_id: str) -> int:
    """A 64-bit hash of a custom_id.

    Python's own string hash: fast, and keyed per process, so nobody can craft colliding ids.
    """
    return hash(custom_id) & _HASH_MASK


class IdHashes:
    """custom_id hashes in 8 bytes each (where a set of the ids takes about 100), and which repeat.

    Hashes are appended to buckets by their top bits; :meth:`repeated` sorts one bucket at a time,
    so finding the repeats never holds more than a bucket's worth of Python ints. A repeat may be
    a collision: the caller confirms it exactly before calling a line a duplicate.
    """

    SHIFT = 58  # 64 buckets

    def __init__(self) -> None:
        self.buckets = [array("Q") for _ in range(1 << (64 - self.SHIFT))]

    def add(self, h: int) -> None:
        """Add hash ``h`` (from :func:`id_hash`)."""
        self.buckets[h >> self.SHIFT].append(h)

    def repeated(self) -> set[int]:
        """The hashes added more than once; afterwards :meth:`has` answers and :meth:`add` must not be called."""
        found: set[int] = set()
        for i, bucket in enumerate(self.buckets):
            ordered = sorted(bucket)
            found.update(a for a, b in zip(ordered, itertools.islice(ordered, 1, None)) if a == b)
            self.buckets[i] = array("Q", ordered)
        return found

    def has(self, h: int) -> bool:
        """Whether hash ``h`` was added (only after :meth:`repeated`)."""
        bucket = self.buckets[h >> self.SHIFT]
        i = bisect.bisect_left(bucket, h)
        return i < len(bucket) and bucket[i] == h


def estimate_tokens(body_len: int, max_tokens: int) -> int:
    """Rough token cost of a request: about 4 bytes of prompt per token, plus the output cap."""
    return body_len // 4 + 1 + max(0, max_tokens)


def model_error(model: str, line: int) -> BatchError:
    """The error for a model that no configured provider serves."""
    return _err(
        "model_not_found", f"The provided model '{model[:200]}' is not served by any provider.", "body.model", line
    )


def duplicate_error(line: int) -> BatchError:
    """The error for a custom_id already used by an earlier line."""
    return _err(
        "duplicate_custom_id", "The custom_id for this request is a duplicate of another request.", "custom_id", line
    )


def too_many_error(limit: int) -> BatchError:
    """The error for a file with more request lines than a batch may hold."""
    return _err("too_many_tasks", f"The batch input file has more than {limit} requests.", None, None)


def empty_error() -> BatchError:
    """The error for a file without a single request line."""
    return _err("empty_file", "The batch input file is empty.", None, None)
