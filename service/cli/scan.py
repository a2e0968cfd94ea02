"""The local check of a batch input file before ``sluice submit`` uploads anything, and its split into parts.

One streaming pass validates every request line as the server would (service/core/validation.py:
JSON, required fields, method, url, body.model, streaming), finds custom_ids used twice anywhere in
the file, and cuts the file into parts that each fit one batch of the server (its line and byte
limits). Only a 64-bit hash of each custom_id is kept during the pass, in 256 buckets (about 8 MB
for a million lines); a second pass over the file confirms the few hashes seen twice and names
the lines.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from service.core.validation import (
    BOM,
    MAX_LINE_BYTES,
    Line,
    check_line,
    duplicate_error,
)
from service.core.wire import BatchError

from .display import Progress
from .http import ClientError

BUCKETS = 256
HASH_MASK = (1 << 64) - 1
KEPT_ERRORS = 20  # errors kept to show; the count goes on


@dataclass(frozen=True)
class Span:
    """A part of the input file: whole lines ``start:end`` (bytes), holding ``lines`` request lines."""

    start: int
    end: int
    lines: int
    first_line: int  # physical number (1-based) of the part's first line in the input file


@dataclass
class Scan:
    """What the pass found: request lines, the parts, and the first errors (with their total count)."""

    lines: int = 0
    spans: list[Span] = field(default_factory=list)
    errors: list[BatchError] = field(default_factory=list)
    error_count: int = 0

    def add_error(self, error: BatchError) -> None:
        self.error_count += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(error)


def _raw_lines(f: IO[bytes]) -> Iterator[tuple[int, int, bytes | None]]:
    """(1-based number, end offset, bytes or None when longer than a line may be) of every physical line."""
    number, pos = 0, 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        pos += len(raw)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest without holding it
                raw = f.readline(1024 * 1024)
                pos += len(raw)
            yield number, pos, None
            continue
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        yield number, pos, raw


def scan(path: Path, endpoint: str, *, max_lines: int, max_bytes: int, progress: Progress | None = None) -> Scan:
    """Check every line of ``path`` against ``endpoint`` and cut it into parts of at most ``max_lines`` / ``max_bytes``."""
    result = Scan()
    buckets = [array("Q") for _ in range(BUCKETS)]
    # Every part ends just after a request line, so blank lines never push one over the byte limit.
    part_start, part_lines, last_end, last_request_end = 0, 0, 0, 0
    part_first, last_request_number = 1, 0
    with open(path, "rb") as f:
        for number, end, raw in _raw_lines(f):
            if progress is not None:
                progress.advance(end - last_end)
            line_start, last_end = last_end, end
            if raw is not None and not raw.strip():
                continue
            result.lines += 1
            checked = check_line(Line(number, raw.rstrip(b"\r\n") if raw is not None else None), endpoint)
            if isinstance(checked, BatchError):
                result.add_error(checked)
            else:
                h = hash(checked.custom_id) & HASH_MASK
                buckets[h % BUCKETS].append(h)
            if end - line_start > max_bytes:
                result.add_error(
                    BatchError(
                        code="line_too_long",
                        line=number,
                        param=None,
                        message=f"This line ({end - line_start} bytes) is bigger than a batch file may be on this "
                        f"server ({max_bytes} bytes).",
                    )
                )
            if part_lines and (part_lines >= max_lines or end - part_start > max_bytes):
                result.spans.append(Span(part_start, last_request_end, part_lines, part_first))
                part_start, part_lines, part_first = last_request_end, 0, last_request_number + 1
            part_lines += 1
            last_request_end, last_request_number = end, number
    if part_lines:
        result.spans.append(Span(part_start, last_request_end, part_lines, part_first))
    twice = _hashes_seen_twice(buckets)
    if twice:
        for error in _duplicates(path, endpoint, twice):
            result.add_error(error)
        result.errors.sort(key=lambda e: e.line or 0)
    return result


def _hashes_seen_twice(buckets: list[array]) -> set[int]:
    twice: set[int] = set()
    for bucket in buckets:
        if len(set(bucket)) == len(bucket):
            continue
        seen: set[int] = set()
        for h in bucket:
            if h in seen:
                twice.add(h)
            seen.add(h)
    return twice


def _duplicates(path: Path, endpoint: str, hashes: set[int]) -> Iterator[BatchError]:
    """The lines whose custom_id an earlier line used (hash collisions of different ids are no duplicates)."""
    first_seen: set[str] = set()
    with open(path, "rb") as f:
        for number, _, raw in _raw_lines(f):
            if raw is None or not raw.strip():
                continue
            checked = check_line(Line(number, raw.rstrip(b"\r\n")), endpoint)
            if isinstance(checked, BatchError) or (hash(checked.custom_id) & HASH_MASK) not in hashes:
                continue
            if checked.custom_id in first_seen:
                yield duplicate_error(number)
            else:
                first_seen.add(checked.custom_id)


def refuse(path: Path, found: Scan, shown_lines: dict[int, str]) -> ClientError:
    """The error listing the invalid lines of a file that was not uploaded."""
    n = found.error_count
    out = [f"{n} invalid line{'s' if n != 1 else ''} in {path} (nothing was uploaded):"]
    for e in found.errors:
        param = f" [{e.param}]" if e.param else ""
        out.append(f"  line {e.line}: {e.code}{param}: {e.message}")
        if e.line in shown_lines:
            out.append(f"    > {shown_lines[e.line]}")
    if n > len(found.errors):
        out.append(f"  ... and {n - len(found.errors)} more")
    return ClientError("\n".join(out))
