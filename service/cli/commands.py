"""The API client's commands: ``sluice submit``, ``sluice batches ...``, ``sluice files ...`` and ``sluice usage``.

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
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from service.core.wire import BATCH_ENDPOINTS, TERMINAL_STATUSES, UPLOAD_PURPOSES

from .display import (
    Progress,
    Rate,
    human_bytes,
    human_duration,
    human_time,
    print_fields,
    print_json,
    progress_text,
    text_table,
)
from .http import (
    CONNECTION_GRACE_S,
    DEFAULT_URL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    APIStatusError,
    Client,
    ClientError,
    Target,
    resolve_target,
)

DEFAULT_ENDPOINT = "/v1/chat/completions"
BIG_FILE_BYTES = 1024 * 1024  # uploads at least this big get a progress display
CHECK_LINES = 5  # lines parsed locally before an upload
MAX_CHECK_LINE_BYTES = 32 * 1024 * 1024
SHOWN_ERRORS = 20
LINE_PREVIEW = 160
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
    u = b.get("usage")
    if u and u.get("total_tokens"):
        rows.append(("tokens", f"{u['input_tokens']} in ({u['input_tokens_details']['cached_tokens']} cached), "
                               f"{u['output_tokens']} out ({u['output_tokens_details']['reasoning_tokens']} reasoning)"))
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


# -- usage
async def cmd_usage(args: argparse.Namespace, target: Target) -> int:
    """``sluice usage``: this token's tokens by day, provider and model (``GET /v1/sluice/usage``)."""
    if not 1 <= args.days <= 400:
        raise ClientError("--days must be between 1 and 400", EXIT_USAGE)
    async with Client(target) as client:
        report = await client.request("GET", "/sluice/usage", params={"days": str(args.days)})
    if args.json:
        print_json(report)
        return EXIT_OK
    rows = report.get("data") or []
    if not rows:
        print(f"no usage from {report.get('start_date')} to {report.get('end_date')}")
        return EXIT_OK
    table = [[r["date"], r["provider"], r["model"], str(r["requests"]), str(r["input_tokens"]),
              str(r["input_tokens_details"]["cached_tokens"]), str(r["output_tokens"]),
              str(r["output_tokens_details"]["reasoning_tokens"]), str(r["total_tokens"])] for r in rows]
    total = [sum(int(row[i]) for row in table) for i in range(3, 9)]
    table.append(["total", "", "", *map(str, total)])
    print("\n".join(text_table(["DATE", "PROVIDER", "MODEL", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "REASONING",
                                "TOTAL"], table)))
    return EXIT_OK


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
    """Add ``submit``, ``batches``, ``files`` and ``usage`` to the ``sluice`` subparsers."""
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

    usage = sub.add_parser("usage", help="tokens used by this token, by day, provider and model",
                           description="Tokens used by the API token, by UTC day, provider and model.")
    usage.add_argument("--days", type=int, default=7, help="how many days back, today included (1..400, default 7)")
    _common(usage)
    usage.set_defaults(func=_run(cmd_usage))


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
