"""The command-line client: ``sluice submit``, ``sluice batches ...`` and ``sluice files ...``.

An HTTP client of Sluice's public API only (aiohttp), for people and scripts: human-readable
output by default, the API objects with ``--json``. Progress and messages go to stderr, results
to stdout.

Server URL and token come from ``--url`` / ``--token`` (the OpenAI CLI's ``--api-base`` /
``--api-key`` are accepted too), else ``SLUICE_URL`` / ``SLUICE_TOKEN``, else
``http://localhost:8000`` and the development token ``sluice up`` keeps in
``$SLUICE_DATA_DIR/dev-token``.

Exit codes: 0 success (a batch that completed), 1 a batch that failed, expired or was cancelled,
or an error, 2 a usage mistake, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .textfmt import text_table
from .wire import BATCH_ENDPOINTS, TERMINAL_STATUSES, UPLOAD_PURPOSES

DEFAULT_URL = "http://localhost:8000"
DEFAULT_ENDPOINT = "/v1/chat/completions"
UPLOAD_CHUNK = 1024 * 1024
BIG_FILE_BYTES = 1024 * 1024  # uploads at least this big get a progress display
CHECK_LINES = 5  # lines parsed locally before an upload
MAX_CHECK_LINE_BYTES = 32 * 1024 * 1024
SHOWN_ERRORS = 20
LINE_PREVIEW = 160
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONNECTION_GRACE_S = 60.0  # how long --wait rides out an unreachable server


class ClientError(Exception):
    """A mistake or failure to report in one message, with the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class APIStatusError(ClientError):
    """Sluice answered with an error status."""

    def __init__(self, message: str, status: int, body: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


# ----------------------------------------------------------------------------- connection settings
@dataclass(frozen=True)
class Target:
    url: str  # the web root, without /v1
    token: str

    @property
    def api(self) -> str:
        return self.url + "/v1"


def normalize_url(raw: str) -> str:
    """The web root of a Sluice URL given with or without ``/v1`` (and a scheme)."""
    url = raw.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/v1")
    return url


def _dev_token() -> str | None:
    path = Path(os.environ.get("SLUICE_DATA_DIR", "").strip() or "./var/data") / "dev-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def resolve_target(args: argparse.Namespace) -> Target:
    """URL and token from the flags, else the environment, else the local development defaults."""
    url = getattr(args, "url", None) or os.environ.get("SLUICE_URL", "").strip() or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("SLUICE_TOKEN", "").strip() or _dev_token()
    if not token:
        raise ClientError("no token: pass --token TOKEN or set SLUICE_TOKEN (the token `sluice up` printed, "
                          "or one of SLUICE_API_TOKENS)", EXIT_USAGE)
    return Target(normalize_url(url), token)


# ----------------------------------------------------------------------------- HTTP
class Client:
    """The few calls of the Files and Batches APIs the commands need."""

    def __init__(self, target: Target, *, timeout: float = 60.0) -> None:
        self.target = target
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={"Authorization": f"Bearer {self.target.token}", "User-Agent": "sluice-cli"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    def _unreachable(self, exc: BaseException) -> ClientError:
        reason = str(exc) or type(exc).__name__
        return ClientError(f"cannot reach Sluice at {self.target.url}: {reason}\n"
                           "Check --url or SLUICE_URL (is `sluice web` or `sluice up` running there?)")

    async def _error_from(self, resp: aiohttp.ClientResponse) -> APIStatusError:
        raw = await resp.read()
        body: dict[str, Any] | None = None
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                body = parsed["error"]
        except ValueError:
            pass
        if body is None:
            return APIStatusError(
                f"{self.target.url} did not answer like Sluice (HTTP {resp.status} for {resp.method} {resp.url.path}, "
                f"{resp.content_type or 'no content type'}); check --url or SLUICE_URL",
                resp.status, None,
            )
        message = str(body.get("message") or "")
        if resp.status == 401:
            return APIStatusError(f"the token was refused by Sluice at {self.target.url} ({message.rstrip('.')}); "
                                  "check --token or SLUICE_TOKEN", 401, body)
        details = ", ".join(f"{k} {body[k]}" for k in ("code", "param") if body.get(k))
        return APIStatusError(f"{message}" + (f" ({details})" if details else "") + f" [HTTP {resp.status}]",
                              resp.status, body)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer, or a ClientError saying what went wrong."""
        assert self._session is not None
        try:
            async with self._session.request(method, self.target.api + path, **kwargs) as resp:
                if resp.status >= 400:
                    raise await self._error_from(resp)
                raw = await resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ClientError(f"{self.target.url} did not answer like Sluice (not JSON from "
                                      f"{method} {resp.url.path}); check --url or SLUICE_URL") from None
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.InvalidURL, OSError) as exc:
            raise self._unreachable(exc) from None

    async def upload(self, path: Path, purpose: str, progress: Progress | None) -> dict[str, Any]:
        """POST /files as multipart/form-data, streaming the file (and counting what was sent)."""
        boundary = f"sluice-{uuid.uuid4().hex}"
        name = path.name.replace('"', "'").replace("\r", "").replace("\n", "")
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: application/jsonl\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size

        async def body() -> AsyncIterator[bytes]:
            yield head
            with open(path, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    yield chunk
                    if progress is not None:
                        progress.advance(len(chunk))
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        return await self.request("POST", "/files", data=body(), headers=headers)

    async def download(self, file_id: str, dest: Path | None) -> int:
        """GET /files/{id}/content into ``dest`` (written whole, then renamed) or stdout; the bytes."""
        assert self._session is not None
        written = 0
        try:
            async with self._session.get(f"{self.target.api}/files/{file_id}/content") as resp:
                if resp.status >= 400:
                    raise await self._error_from(resp)
                if dest is None:
                    out = sys.stdout.buffer
                    async for chunk in resp.content.iter_chunked(UPLOAD_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                    out.flush()
                    return written
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".part")
                try:
                    with open(part, "wb") as f:
                        async for chunk in resp.content.iter_chunked(UPLOAD_CHUNK):
                            f.write(chunk)
                            written += len(chunk)
                    os.replace(part, dest)
                finally:
                    part.unlink(missing_ok=True)
                return written
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.InvalidURL) as exc:
            raise self._unreachable(exc) from None


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


# ----------------------------------------------------------------------------- local checks
def check_jsonl(path: Path) -> str | None:
    """The first request line's ``url``; a ClientError when the file does not look like JSONL."""
    if not path.exists():
        raise ClientError(f"{path}: no such file", EXIT_USAGE)
    if not path.is_file():
        raise ClientError(f"{path}: not a regular file", EXIT_USAGE)
    first_url: str | None = None
    seen = 0
    with open(path, "rb") as f:
        number = 0
        while seen < CHECK_LINES:
            raw = f.readline(MAX_CHECK_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if len(raw) > MAX_CHECK_LINE_BYTES:
                raise ClientError(f"{path} is not a JSONL file: line {number} is longer than "
                                  f"{MAX_CHECK_LINE_BYTES} bytes")
            line = raw.strip()
            if not line:
                continue
            seen += 1
            try:
                value = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ClientError(
                    f"{path} is not a JSONL file: line {number} is not valid JSON ({exc}):\n"
                    f"  {number}: {preview(line)}\n"
                    "A batch input file holds one JSON request object per line (JSON Lines)."
                ) from None
            if not isinstance(value, dict):
                raise ClientError(
                    f"{path} is not a JSONL file: line {number} is a JSON {type(value).__name__}, "
                    f"not an object:\n  {number}: {preview(line)}\n"
                    "A batch input file holds one JSON request object per line (JSON Lines)."
                )
            if first_url is None and isinstance(value.get("url"), str):
                first_url = value["url"]
    if seen == 0:
        raise ClientError(f"{path} is empty: a batch input file needs at least one request line")
    return first_url


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


def print_batch_errors(batch: dict[str, Any], local: Path | None, out: TextIO) -> None:
    data = ((batch.get("errors") or {}).get("data")) or []
    if not data:
        return
    where = f" in {local}" if local is not None else ""
    print(f"{len(data)} invalid line{'s' if len(data) != 1 else ''}{where} (nothing was sent upstream):", file=out)
    shown = data[:SHOWN_ERRORS]
    lines = read_lines(local, {e["line"] for e in shown if e.get("line")}) if local is not None else {}
    for e in shown:
        at = f"line {e['line']}" if e.get("line") else "file"
        param = f" [{e['param']}]" if e.get("param") else ""
        print(f"  {at}: {e.get('code')}{param}: {e.get('message')}", file=out)
        if e.get("line") in lines:
            print(f"    > {lines[e['line']]}", file=out)
    if len(data) > len(shown):
        print(f"  ... and {len(data) - len(shown)} more (sluice batches get {batch['id']} --json)", file=out)


# ----------------------------------------------------------------------------- commands
def _status_exit(batch: dict[str, Any]) -> int:
    return EXIT_OK if batch["status"] == "completed" else EXIT_FAILED


async def cmd_submit(args: argparse.Namespace, target: Target) -> int:
    path = Path(args.file)
    first_url = check_jsonl(path)
    endpoint = args.endpoint or (first_url if first_url in BATCH_ENDPOINTS else DEFAULT_ENDPOINT)
    if endpoint not in BATCH_ENDPOINTS:
        raise ClientError(f"unknown endpoint {endpoint!r}; one of: {', '.join(BATCH_ENDPOINTS)}", EXIT_USAGE)
    metadata = _metadata(args.metadata)
    err = sys.stderr
    async with Client(target) as client:
        size = path.stat().st_size
        progress = None
        if size >= BIG_FILE_BYTES and not args.quiet:
            progress = Progress(f"uploading {path.name}", size, err)
        uploaded = await client.upload(path, "batch", progress)
        if progress is not None:
            progress.finish()
        if not args.quiet:
            print(f"uploaded {path} ({human_bytes(uploaded['bytes'])}) as {uploaded['id']}", file=err)
        body: dict[str, Any] = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        batch = await client.request("POST", "/batches", json=body)
        if not args.wait:
            if args.json:
                print_json(batch)
            else:
                print(f"{batch['id']} {batch['status']} (input {uploaded['id']}, endpoint {endpoint})")
                print(f"follow it with: sluice batches get {batch['id']}", file=err)
            return EXIT_OK
        if not args.quiet:
            print(f"created batch {batch['id']} (endpoint {endpoint}); waiting for it to end, Ctrl-C to stop",
                  file=err)
        return await wait_and_collect(client, batch, args, local=path)


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--metadata expects KEY=VALUE, got {pair!r}", EXIT_USAGE)
        metadata[key] = value
    return metadata


class _Interrupts:
    """Turns SIGINT into a flag and a wake-up while waiting, so the wait can ask what to do."""

    def __init__(self, wake: asyncio.Event) -> None:
        self.wake = wake
        self.hit = False
        self._loop = asyncio.get_running_loop()
        self._installed = False

    def _on_sigint(self) -> None:
        self.hit = True
        self.wake.set()

    def install(self) -> None:
        try:
            self._loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            self._installed = True
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass

    def remove(self) -> None:
        if self._installed:
            self._loop.remove_signal_handler(signal.SIGINT)
            self._installed = False


def _interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


def _ask_cancel(batch_id: str) -> bool:
    """Ask on the terminal; Ctrl-C or end of input at the prompt count as no."""
    # The prompt goes to stderr (stdout may be redirected to a file), the answer comes from the terminal.
    sys.stderr.write(f"Cancel batch {batch_id}? [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return False
    return answer.strip().lower() in ("y", "yes")


async def follow_events(client: Client, batch_id: str, state: dict[str, Any], wake: asyncio.Event) -> bool:
    """Keep ``state["batch"]`` current from ``GET /batches/{id}/events`` (Server-Sent Events).

    Returns True once the stream said the batch ended, False when there is no such stream here
    (an older server) or it broke off: the caller then polls instead. Never raises.
    """
    assert client._session is not None
    url = f"{client.target.api}/batches/{batch_id}/events"
    try:
        async with client._session.get(url, headers={"Accept": "text/event-stream"},
                                       timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)) as resp:
            if resp.status != 200 or resp.content_type != "text/event-stream":
                return False
            event, data = "", []
            async for raw in resp.content:  # one line at a time
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    continue
                if event == "batch" and data:
                    value = json.loads("\n".join(data))
                    if isinstance(value, dict) and value.get("id") == batch_id:
                        state["batch"] = value
                        wake.set()
                elif event == "done":
                    return True
                event, data = "", []
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        pass
    return False


async def wait_and_collect(client: Client, batch: dict[str, Any], args: argparse.Namespace, *,
                           local: Path | None) -> int:
    """Follow a batch until it ends, download its result files into ``args.out``, print a summary."""
    err = sys.stderr
    tty = err.isatty() and not args.quiet
    interval = max(0.05, args.poll_interval)
    started = time.monotonic()
    rate = Rate()
    wake = asyncio.Event()
    interrupts = _Interrupts(wake)
    interrupts.install()
    state = {"batch": batch}
    events: asyncio.Task[bool] | None = None
    if not args.poll:
        events = asyncio.create_task(follow_events(client, batch["id"], state, wake))
    cancelled_by_us = False
    last_line, last_print = "", 0.0
    open_line = False  # a progress line drawn in place, not yet ended
    unreachable_since: float | None = None
    batch_id = batch["id"]
    try:
        while True:
            batch = state["batch"]
            now = time.monotonic()
            counts = batch.get("request_counts") or {}
            r = rate.add(now, counts.get("completed", 0) + counts.get("failed", 0))
            if not args.quiet:
                line = progress_text(batch, r)
                if tty:
                    err.write(f"\r{line}\x1b[K")
                    err.flush()
                    open_line = True
                elif line != last_line and (now - last_print >= 2.0 or batch["status"] in TERMINAL_STATUSES
                                            or line.split(":")[0] != last_line.split(":")[0]):
                    print(line, file=err, flush=True)
                    last_line, last_print = line, now
            if batch["status"] in TERMINAL_STATUSES:
                break
            try:
                await asyncio.wait_for(wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            wake.clear()
            if interrupts.hit:
                interrupts.hit = False
                if open_line:
                    err.write("\n")
                    open_line = False
                if cancelled_by_us or not _interactive():
                    _print_detach_hint(batch_id, cancelled_by_us)
                    return EXIT_INTERRUPTED
                interrupts.remove()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                try:
                    cancel = _ask_cancel(batch_id)
                finally:
                    interrupts.install()
                if not cancel:
                    _print_detach_hint(batch_id, False)
                    return EXIT_INTERRUPTED
                try:
                    state["batch"] = await client.request("POST", f"/batches/{batch_id}/cancel")
                except APIStatusError as exc:
                    if exc.status != 409:
                        raise
                    print(f"too late to cancel: {exc.body.get('message')}", file=err)
                else:
                    cancelled_by_us = True
                    print(f"cancelling {batch_id}; waiting for its partial results (Ctrl-C again to stop waiting)",
                          file=err)
                continue
            if events is not None and not events.done():
                continue  # the event stream keeps state["batch"] current
            try:
                state["batch"] = await client.request("GET", f"/batches/{batch_id}")
                unreachable_since = None
            except APIStatusError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise
                # A restarting web process: keep following.
            except ClientError as exc:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > CONNECTION_GRACE_S:
                    raise ClientError(f"{exc.message}\nbatch {batch_id} may still be running; "
                                      f"`sluice batches get {batch_id}` shows it") from None
    finally:
        interrupts.remove()
        if events is not None and not events.done():
            events.cancel()
            try:
                await events
            except asyncio.CancelledError:
                pass
        if open_line:
            err.write("\n")
            err.flush()

    if batch.get("errors") and (batch["errors"].get("data")):
        print_batch_errors(batch, local, err)
    out_dir = Path(args.out)
    written: list[str] = []
    for kind, key in (("output", "output_file_id"), ("errors", "error_file_id")):
        file_id = batch.get(key)
        if file_id:
            dest = out_dir / f"{batch_id}_{kind}.jsonl"
            await client.download(file_id, dest)
            written.append(f"{kind} {dest}")
    if args.json:
        print_json(batch)
    else:
        counts = batch.get("request_counts") or {}
        files = "; ".join(written) if written else "no result files"
        invalid = len(((batch.get("errors") or {}).get("data")) or [])
        if batch["status"] == "failed" and invalid:
            print(f"{batch_id} failed: {invalid} invalid line{'s' if invalid != 1 else ''}, nothing was sent upstream;"
                  f" {files}")
            return _status_exit(batch)
        print(f"{batch_id} {batch['status']}: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} "
              f"failed of {counts.get('total', 0)} in {human_duration(time.monotonic() - started)}; {files}")
    return _status_exit(batch)


def _print_detach_hint(batch_id: str, cancelling: bool) -> None:
    state = "is being cancelled" if cancelling else "keeps running"
    print(f"stopped waiting; batch {batch_id} {state} on the server.\n"
          f"  follow it: sluice batches get {batch_id}\n"
          f"  cancel it: sluice batches cancel {batch_id}", file=sys.stderr, flush=True)


# -- batches
def describe_batch(b: dict[str, Any], out: TextIO) -> None:
    counts = b.get("request_counts") or {}
    rows = [
        ("id", b["id"]), ("status", b["status"]), ("endpoint", b.get("endpoint")), ("model", b.get("model")),
        ("input file", b.get("input_file_id")), ("output file", b.get("output_file_id")),
        ("error file", b.get("error_file_id")),
        ("requests", f"{counts.get('total', 0)} total, {counts.get('completed', 0)} completed, "
                     f"{counts.get('failed', 0)} failed"),
        ("created", human_time(b.get("created_at"))),
    ]
    for field in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                  "cancelled_at", "expires_at"):
        if b.get(field):
            rows.append((field.removesuffix("_at").replace("_", " ") + (" at" if field == "expires_at" else ""),
                         human_time(b[field])))
    if b.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in b["metadata"].items())))
    print_fields(rows, out)
    print_batch_errors(b, None, out)


def _done(args: argparse.Namespace, obj: dict[str, Any], text: str) -> int:
    """Report an action's result: the API object with ``--json``, else one line of text."""
    if args.json:
        print_json(obj)
    else:
        print(text)
    return EXIT_OK


async def _list(
    client: "Client", args: argparse.Namespace, kind: str, params: dict[str, str],
    header: list[str], row: Callable[[dict[str, Any]], list[str]],
) -> int:
    """``sluice batches|files list``: one page as a table (or JSON), with the command for the next."""
    params = {"limit": str(args.limit), **params}
    if args.after:
        params["after"] = args.after
    page = await client.request("GET", f"/{kind}", params=params)
    if args.json:
        print_json(page)
        return EXIT_OK
    if not page["data"]:
        print(f"no {kind}")
        return EXIT_OK
    print("\n".join(text_table(header, [row(item) for item in page["data"]])))
    if page.get("has_more"):
        print(f"(more: sluice {kind} list --after {page['last_id']})", file=sys.stderr)
    return EXIT_OK


async def cmd_batches(args: argparse.Namespace, target: Target) -> int:
    action = args.batches_command or "list"
    async with Client(target) as client:
        if action == "list":
            def row(b: dict[str, Any]) -> list[str]:
                c = b.get("request_counts") or {}
                return [b["id"], b["status"], f"{c.get('completed', 0) + c.get('failed', 0)}/{c.get('total', 0)}",
                        str(c.get("failed", 0)), b.get("endpoint") or "", human_time(b.get("created_at"))]
            return await _list(client, args, "batches", {},
                               ["ID", "STATUS", "DONE/TOTAL", "FAILED", "ENDPOINT", "CREATED"], row)
        if action == "get":
            b = await client.request("GET", f"/batches/{args.id}")
            print_json(b) if args.json else describe_batch(b, sys.stdout)
            return EXIT_OK
        if action == "cancel":
            try:
                b = await client.request("POST", f"/batches/{args.id}/cancel")
            except APIStatusError as exc:
                if exc.status == 409:
                    raise ClientError(f"cannot cancel {args.id}: {exc.body.get('message')}") from None
                raise
            return _done(args, b, f"{b['id']} {b['status']}")
    raise ClientError(f"unknown action {action!r}", EXIT_USAGE)


# -- files
def describe_file(f: dict[str, Any], out: TextIO) -> None:
    rows = [("id", f["id"]), ("filename", f.get("filename")), ("purpose", f.get("purpose")),
            ("bytes", f"{f.get('bytes')} ({human_bytes(f.get('bytes') or 0)})"),
            ("created", human_time(f.get("created_at"))), ("expires", human_time(f.get("expires_at"))),
            ("status", f.get("status"))]
    print_fields(rows, out)


def _safe_name(name: str, fallback: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base if base not in ("", ".", "..") else fallback


async def cmd_files(args: argparse.Namespace, target: Target) -> int:
    action = args.files_command or "list"
    async with Client(target) as client:
        if action == "list":
            return await _list(
                client, args, "files", {"purpose": args.purpose} if args.purpose else {},
                ["ID", "PURPOSE", "BYTES", "CREATED", "FILENAME"],
                lambda f: [f["id"], f.get("purpose") or "", human_bytes(f.get("bytes") or 0),
                           human_time(f.get("created_at")), f.get("filename") or ""])
        if action == "get":
            f = await client.request("GET", f"/files/{args.id}")
            print_json(f) if args.json else describe_file(f, sys.stdout)
            return EXIT_OK
        if action == "download":
            f = await client.request("GET", f"/files/{args.id}")
            if args.output == "-":
                await client.download(args.id, None)
                return EXIT_OK
            dest = Path(args.output) if args.output else Path(_safe_name(f.get("filename") or "", f["id"]))
            if dest.is_dir():
                dest = dest / _safe_name(f.get("filename") or "", f["id"])
            n = await client.download(args.id, dest)
            return _done(args, f, f"saved {f['id']} to {dest} ({human_bytes(n)})")
        if action == "delete":
            d = await client.request("DELETE", f"/files/{args.id}")
            return _done(args, d, f"deleted {d['id']}")
    raise ClientError(f"unknown action {action!r}", EXIT_USAGE)


# ----------------------------------------------------------------------------- argparse wiring
def _common(parser: argparse.ArgumentParser) -> None:
    """Connection and output options, accepted at every level (``sluice batches --json list`` or after)."""
    g = parser.add_argument_group("connection")
    g.add_argument("--url", "--api-base", "-b", dest="url", default=argparse.SUPPRESS, metavar="URL",
                   help=f"Sluice's URL, with or without /v1 (default: $SLUICE_URL, else {DEFAULT_URL})")
    g.add_argument("--token", "--api-key", "-k", dest="token", default=argparse.SUPPRESS, metavar="TOKEN",
                   help="API token (default: $SLUICE_TOKEN, else the dev token of `sluice up`)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the API objects as JSON (for scripts)")


def add_client_commands(sub: Any) -> None:
    """Add ``submit``, ``batches`` and ``files`` to the ``sluice`` subparsers."""
    submit = sub.add_parser("submit", help="upload a JSONL file and create a batch (--wait: follow it, get results)",
                            description="Upload a batch input file and create a batch from it.")
    submit.add_argument("file", help="the JSONL file of requests")
    submit.add_argument("--endpoint", "-e", choices=BATCH_ENDPOINTS, metavar="ENDPOINT",
                        help="the batch endpoint (default: the first line's url, else /v1/chat/completions)")
    submit.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE", help="batch metadata (repeatable)")
    submit.add_argument("--wait", "-w", action="store_true",
                        help="follow the batch until it ends, then download its result files")
    submit.add_argument("--out", "-o", default=".", metavar="DIR",
                        help="with --wait: where the output and error files go (default: .)")
    submit.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    submit.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)  # no event stream, poll only
    submit.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _common(submit)
    submit.set_defaults(func=_run(cmd_submit))

    batches = sub.add_parser("batches", help="list, show or cancel batches", description="List, show or cancel batches.")
    _common(batches)
    bsub = batches.add_subparsers(dest="batches_command", metavar="{list,get,cancel}")
    bl = bsub.add_parser("list", help="the newest batches")
    bl.add_argument("--limit", type=int, default=20, help="how many (1..100, default 20)")
    bl.add_argument("--after", metavar="BATCH_ID", help="the page after this id")
    for name, text in (("get", "one batch, with its counts and errors"), ("cancel", "cancel a batch")):
        p = bsub.add_parser(name, help=text)
        p.add_argument("id", metavar="BATCH_ID")
        _common(p)
    _common(bl)
    batches.set_defaults(func=_run(cmd_batches), limit=20, after=None)

    files = sub.add_parser("files", help="list, show, download or delete files",
                           description="List, show, download or delete files.")
    _common(files)
    fsub = files.add_subparsers(dest="files_command", metavar="{list,get,download,delete}")
    fl = fsub.add_parser("list", help="the newest files")
    fl.add_argument("--purpose", choices=sorted(set(UPLOAD_PURPOSES) | {"batch_output"}))
    fl.add_argument("--limit", type=int, default=100, help="how many (1..10000, default 100)")
    fl.add_argument("--after", metavar="FILE_ID", help="the page after this id")
    _common(fl)
    for name, text in (("get", "one file's details"), ("download", "save a file's content"),
                       ("delete", "delete a file")):
        p = fsub.add_parser(name, help=text)
        p.add_argument("id", metavar="FILE_ID")
        if name == "download":
            p.add_argument("--output", "-o", metavar="PATH",
                           help="where to save it: a path, a directory, or - for stdout (default: its filename)")
        _common(p)
    files.set_defaults(func=_run(cmd_files), limit=100, after=None, purpose=None, output=None)


def _run(command: Callable[[argparse.Namespace, Target], Any]) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        if not hasattr(args, "json"):
            args.json = False
        try:
            target = resolve_target(args)
            code = asyncio.run(command(args, target))
        except ClientError as exc:
            print(f"sluice: {exc.message}", file=sys.stderr)
            code = exc.code
        except KeyboardInterrupt:
            print("\nsluice: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        sys.stdout.flush()
        raise SystemExit(code)

    return run
