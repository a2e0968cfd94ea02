"""Plain-text output of the terminal commands (``sluice status``, the API client): tables,
sizes, durations, progress."""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

LINE_PREVIEW = 160  # characters of a request line shown beside its error
SHOWN_ERRORS = 20


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a table whose columns are left-aligned and two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


# ----------------------------------------------------------------------------- display helpers
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_duration(seconds: float) -> str:
    seconds = round(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def human_time(ts: int | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def print_fields(rows: list[tuple[str, Any]], out: TextIO) -> None:
    """``name: value`` lines, the values aligned; a missing value shows as ``-``."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v if v is not None else '-'}", file=out)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


class Progress:
    """Upload progress on stderr: a bar redrawn in place on a terminal, a plain line now and then elsewhere."""

    def __init__(self, label: str, total: int, stream: TextIO, *, interval: float | None = None) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.tty else 2.0)
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._render(now)

    def _render(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.started, 1e-6)
        text = f"{human_bytes(self.done)} of {human_bytes(self.total)}, {human_bytes(rate)}/s"
        if self.tty:
            width = 30
            fill = int(frac * width)
            self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac:4.0%} {text}\x1b[K")
        else:
            self.stream.write(f"{self.label}: {frac:.0%} ({text})\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Rate:
    """Requests finished per second over the last ``window`` seconds."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, finished: int) -> float | None:
        self.samples.append((now, finished))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        if now - t0 < 0.5 or finished < n0:
            return None
        return (finished - n0) / (now - t0)


def progress_text(batch: dict[str, Any], rate: float | None) -> str:
    counts = batch.get("request_counts") or {}
    total, completed, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
    text = f"{batch['id']} {batch['status']}"
    if total:
        done = completed + failed
        text += f": {done}/{total} ({done / total:.0%}), {completed} completed, {failed} failed"
        if rate is not None and batch["status"] == "in_progress":
            text += f", {rate:.1f} req/s"
            if rate > 0 and done < total:
                text += f", ETA {human_duration((total - done) / rate)}"
    return text


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########...............]``: the share of ``total`` done, for a line redrawn on a terminal."""
    fill = min(width, int(width * done / total)) if total else 0
    return f"[{'#' * fill}{'.' * (width - fill)}]"


# ----------------------------------------------------------------------------- validation errors
def preview(line: bytes | str, limit: int = LINE_PREVIEW) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def read_lines(path: Path, numbers: set[int]) -> dict[int, str]:
    """The given 1-based physical lines of a local file, previewed (as validation numbers them)."""
    found: dict[int, str] = {}
    if not numbers:
        return found
    last = max(numbers)
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n in numbers:
                    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    found[n] = preview(raw[: LINE_PREVIEW * 4])
                if n >= last:
                    break
    except OSError:
        pass
    return found


def print_batch_errors(batch: dict[str, Any], local: Path | None, out: TextIO, *, line_offset: int = 0) -> None:
    """A failed batch's validation errors: its invalid lines (with the local line when known), then whole-file ones.

    ``line_offset``: where the batch's file starts in ``local`` (a part of a bigger job), in lines.
    """
    data = ((batch.get("errors") or {}).get("data")) or []
    lines_errors = [e for e in data if e.get("line")]
    file_errors = [e for e in data if not e.get("line")]
    if lines_errors:
        n = len(lines_errors)
        where = f" in {local}" if local is not None else ""
        print(f"{n} invalid line{'s' if n != 1 else ''}{where} (nothing was sent upstream):", file=out)
        shown = lines_errors[:SHOWN_ERRORS]
        lines = read_lines(local, {e["line"] + line_offset for e in shown}) if local is not None else {}
        for e in shown:
            number = e["line"] + line_offset
            param = f" [{e['param']}]" if e.get("param") else ""
            print(f"  line {number}: {e.get('code')}{param}: {e.get('message')}", file=out)
            if number in lines:
                print(f"    > {lines[number]}", file=out)
        if n > len(shown):
            print(f"  ... and {n - len(shown)} more (sluice batches get {batch['id']} --json)", file=out)
    for e in file_errors:
        print(f"the file as a whole (nothing was sent upstream): {e.get('code')}: {e.get('message')}", file=out)
        if e.get("code") == "too_many_tasks":
            print(
                "  `sluice submit FILE --wait --out DIR` runs a file over the server's limits as several batches",
                file=out,
            )


def describe_failure(batch: dict[str, Any]) -> str:
    """Why a batch failed validation, in a few words: ``2 invalid lines``, ``too many requests for one batch``."""
    data = ((batch.get("errors") or {}).get("data")) or []
    n = sum(1 for e in data if e.get("line"))
    reasons = [f"{n} invalid line{'s' if n != 1 else ''}"] if n else []
    for e in data:
        if not e.get("line"):
            reasons.append(
                "too many requests for one batch" if e.get("code") == "too_many_tasks" else f"{e.get('code')}"
            )
    return " and ".join(reasons)
