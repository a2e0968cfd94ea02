"""The API client's commands: ``sluice submit``, ``sluice batches ...``, ``sluice files ...`` and ``sluice usage``.

An HTTP client of Sluice's public API only (aiohttp), for people and scripts: human-readable
output by default, the API objects with ``--json``. Progress and messages go to stderr, results
to stdout.

Server URL and token come from ``--url`` / ``--token`` (the OpenAI CLI's ``--api-base`` /
``--api-key`` are accepted too), else ``SLUICE_URL`` / ``SLUICE_TOKEN``, else the running
``sluice up`` stack (its ``stack.json``), else ``http://localhost:8000`` and the development
token ``sluice up`` keeps in ``$SLUICE_DATA_DIR/dev-token``.

``submit --wait`` runs a job (service/cli/jobs.py): the file is checked locally first
(service/cli/scan.py), split into batches that fit the server's limits, and their results merged.

Exit codes: 0 success (a batch that completed), 1 a batch that failed, expired or was cancelled,
or an error, 2 a usage mistake, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from service.core.config import Settings
from service.core.wire import BATCH_ENDPOINTS, UPLOAD_PURPOSES

from . import jobs, retry, scan
from .display import (
    LINE_PREVIEW,
    SHOWN_ERRORS,
    Progress,
    describe_failure,
    human_bytes,
    human_time,
    preview,
    print_batch_errors,
    print_fields,
    print_json,
    read_lines,
    text_table,
)
from .http import (
    DEFAULT_URL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    APIStatusError,
    Client,
    ClientError,
    Target,
    normalize_url,
    resolve_target,
)

__all__ = [
    "LINE_PREVIEW",
    "SHOWN_ERRORS",
    "check_jsonl",
    "describe_failure",
    "preview",
    "print_batch_errors",
    "read_lines",
    "add_client_commands",
]

DEFAULT_ENDPOINT = "/v1/chat/completions"
CHECK_LINES = 5  # lines parsed quickly before anything else, for a clear message about a file that is not JSONL
MAX_CHECK_LINE_BYTES = 32 * 1024 * 1024
SCAN_PROGRESS_BYTES = 50 * 1024 * 1024  # files at least this big show progress while every line is checked


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
                raise ClientError(
                    f"{path} is not a JSONL file: line {number} is longer than {MAX_CHECK_LINE_BYTES} bytes"
                )
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


# ----------------------------------------------------------------------------- commands
async def discover_limits(client: Client) -> tuple[int, int]:
    """What one batch may hold on this server (requests, bytes): from ``GET /v1/sluice/cluster``, else the defaults."""
    defaults = Settings()
    try:
        info = await client.request("GET", "/sluice/cluster")
    except APIStatusError as exc:
        if exc.status == 401:
            raise
        info = {}  # not a Sluice of this version: its defaults, and the server will say if a batch is too big
    limits = info.get("limits") if isinstance(info, dict) else None
    limits = limits if isinstance(limits, dict) else {}
    lines = limits.get("max_batch_lines")
    size = limits.get("max_batch_file_bytes")
    return (
        lines if isinstance(lines, int) and lines > 0 else defaults.max_batch_lines,
        size if isinstance(size, int) and size > 0 else defaults.max_batch_file_bytes,
    )


async def cmd_submit(args: argparse.Namespace, target: Target) -> int:
    out_dir = Path(args.out)
    if args.resume:
        return await _resume(args, target, out_dir)
    if not args.file:
        raise ClientError(
            "submit needs the JSONL FILE of requests (or --resume to go on with an interrupted one)", EXIT_USAGE
        )
    path = Path(args.file)
    first_url = check_jsonl(path)
    endpoint = args.endpoint or (first_url if first_url in BATCH_ENDPOINTS else DEFAULT_ENDPOINT)
    if endpoint not in BATCH_ENDPOINTS:
        raise ClientError(f"unknown endpoint {endpoint!r}; one of: {', '.join(BATCH_ENDPOINTS)}", EXIT_USAGE)
    metadata = _metadata(args.metadata)
    if args.wait:
        resolved = await asyncio.to_thread(path.resolve)
        same = [job for _, job in jobs.unfinished(out_dir) if Path(job.input) == resolved]
        if same:
            raise ClientError(
                f"an unfinished submit of {path} is in {out_dir} ({same[0].job_id}): go on with it "
                f"with `sluice submit {path} --resume --out {out_dir}`, or delete "
                f"{jobs.state_path(out_dir, same[0].job_id)} to start over",
                EXIT_USAGE,
            )
    err = sys.stderr
    async with Client(target) as client:
        max_lines, max_bytes = await discover_limits(client)
        if args.max_batch_lines:
            max_lines = min(max_lines, args.max_batch_lines)
        size = (await asyncio.to_thread(path.stat)).st_size
        progress = None
        if size >= SCAN_PROGRESS_BYTES and not args.quiet:
            progress = Progress(f"checking {path.name}", size, err)
        found = scan.scan(path, endpoint, max_lines=max_lines, max_bytes=max_bytes, progress=progress)
        if progress is not None:
            progress.finish()
        if found.error_count:
            raise scan.refuse(path, found, read_lines(path, {e.line for e in found.errors if e.line}))
        if not args.wait:
            if len(found.spans) > 1:
                raise ClientError(
                    f"{path} holds {found.lines} requests, more than one batch may on this server ({max_lines} "
                    f"requests, {human_bytes(max_bytes)}): add --wait --out DIR to run it as {len(found.spans)} "
                    "batches and merge their results",
                    EXIT_USAGE,
                )
            return await _submit_one(client, args, path, endpoint, metadata)
        job_id = jobs.new_job_id()
        state = jobs.new_state(job_id, path, found.spans, endpoint, metadata, target.url, found.lines)
        state_file = jobs.state_path(out_dir, job_id)
        jobs.save(state_file, state)
        if len(found.spans) > 1 and not args.quiet:
            print(
                f"{path} holds {found.lines} requests, more than one batch may on this server ({max_lines} "
                f"requests, {human_bytes(max_bytes)}): job {job_id} runs it as {len(found.spans)} batches, "
                f"{min(args.parallel, len(found.spans))} at a time (state in {state_file})",
                file=err,
            )
        return await jobs.Job(client, state, state_file, args, parallel=args.parallel).run()


async def _submit_one(
    client: Client, args: argparse.Namespace, path: Path, endpoint: str, metadata: dict[str, str]
) -> int:
    """Upload the file and create its batch, without waiting for it."""
    err = sys.stderr
    size = (await asyncio.to_thread(path.stat)).st_size
    progress = None
    if size >= jobs.BIG_FILE_BYTES and not args.quiet:
        progress = Progress(f"uploading {path.name}", size, err)
    uploaded = await client.upload(path, "batch", progress)
    if progress is not None:
        progress.finish()
    if not args.quiet:
        print(f"uploaded {path} ({human_bytes(uploaded['bytes'])}) as {uploaded['id']}", file=err)
    body: dict[str, Any] = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
    if metadata:
        body["metadata"] = metadata
    batch = await jobs.create_batch(client, body, uploaded["id"])
    if args.json:
        print_json(batch)
    else:
        print(f"{batch['id']} {batch['status']} (input {uploaded['id']}, endpoint {endpoint})")
        print(f"follow it with: sluice batches get {batch['id']}", file=err)
    return EXIT_OK


async def _resume(args: argparse.Namespace, target: Target, out_dir: Path) -> int:
    """``sluice submit [FILE] --resume --out DIR``: go on with the unfinished submit kept in DIR."""
    found = jobs.unfinished(out_dir)
    if args.file:
        resolved = await asyncio.to_thread(Path(args.file).resolve)
        found = [(p, s) for p, s in found if Path(s.input) == resolved]
    of = f" of {args.file}" if args.file else ""
    if not found:
        raise ClientError(
            f"nothing to resume in {out_dir}: no unfinished submit{of} there (a submit that finished "
            f"leaves no *{jobs.STATE_SUFFIX} file)",
            EXIT_USAGE,
        )
    if len(found) > 1:
        names = ", ".join(f"{s.job_id} ({s.input})" for _, s in found)
        raise ClientError(
            f"several unfinished submits in {out_dir}: {names}; name the input file: "
            f"sluice submit FILE --resume --out {out_dir}",
            EXIT_USAGE,
        )
    state_file, state = found[0]
    local = Path(state.input)
    if not await asyncio.to_thread(local.is_file):
        raise ClientError(f"{local}, the input of {state.job_id}, is gone: it is needed to resume")
    if jobs.file_signature(local) != (state.input_size, state.input_mtime_ns):
        raise ClientError(
            f"{local} changed since {state.job_id} started: its parts would not match the batches "
            f"already made; delete {state_file} to start over"
        )
    if normalize_url(state.url) != target.url:
        raise ClientError(
            f"{state.job_id} runs on {state.url}, not {target.url}: point --url or SLUICE_URL there", EXIT_USAGE
        )
    if not args.quiet:
        merged = sum(1 for p in state.parts if p.merged)
        print(f"resuming {state.job_id} ({local}): {merged} of {len(state.parts)} batches done", file=sys.stderr)
    async with Client(target) as client:
        return await jobs.Job(client, state, state_file, args, parallel=args.parallel).run()


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--metadata expects KEY=VALUE, got {pair!r}", EXIT_USAGE)
        metadata[key] = value
    return metadata


# -- batches
def describe_batch(b: dict[str, Any], out: TextIO) -> None:
    counts = b.get("request_counts") or {}
    rows = [
        ("id", b["id"]),
        ("status", b["status"]),
        ("endpoint", b.get("endpoint")),
        ("model", b.get("model")),
        ("input file", b.get("input_file_id")),
        ("output file", b.get("output_file_id")),
        ("error file", b.get("error_file_id")),
        (
            "requests",
            f"{counts.get('total', 0)} total, {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed",
        ),
        ("created", human_time(b.get("created_at"))),
    ]
    u = b.get("usage")
    if u and u.get("total_tokens"):
        rows.append(
            (
                "tokens",
                f"{u['input_tokens']} in ({u['input_tokens_details']['cached_tokens']} cached), "
                f"{u['output_tokens']} out ({u['output_tokens_details']['reasoning_tokens']} reasoning)",
            )
        )
    for field in (
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "expires_at",
    ):
        if b.get(field):
            rows.append(
                (
                    field.removesuffix("_at").replace("_", " ") + (" at" if field == "expires_at" else ""),
                    human_time(b[field]),
                )
            )
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
    client: "Client",
    args: argparse.Namespace,
    kind: str,
    params: dict[str, str],
    header: list[str],
    row: Callable[[dict[str, Any]], list[str]],
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
        print(f"(more: sluice {kind} --after {page['last_id']})", file=sys.stderr)
    return EXIT_OK


async def cmd_batches(args: argparse.Namespace, target: Target) -> int:
    action = args.batches_command or "list"
    async with Client(target) as client:
        if action == "list":

            def row(b: dict[str, Any]) -> list[str]:
                c = b.get("request_counts") or {}
                return [
                    b["id"],
                    b["status"],
                    f"{c.get('completed', 0) + c.get('failed', 0)}/{c.get('total', 0)}",
                    str(c.get("failed", 0)),
                    b.get("endpoint") or "",
                    human_time(b.get("created_at")),
                ]

            return await _list(
                client, args, "batches", {}, ["ID", "STATUS", "DONE/TOTAL", "FAILED", "ENDPOINT", "CREATED"], row
            )
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
        if action == "retry":
            return await retry.run(client, args)
    raise ClientError(f"unknown action {action!r}", EXIT_USAGE)


# -- files
def describe_file(f: dict[str, Any], out: TextIO) -> None:
    rows = [
        ("id", f["id"]),
        ("filename", f.get("filename")),
        ("purpose", f.get("purpose")),
        ("bytes", f"{f.get('bytes')} ({human_bytes(f.get('bytes') or 0)})"),
        ("created", human_time(f.get("created_at"))),
        ("expires", human_time(f.get("expires_at"))),
        ("status", f.get("status")),
    ]
    print_fields(rows, out)


def _safe_name(name: str, fallback: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base if base not in ("", ".", "..") else fallback


async def cmd_files(args: argparse.Namespace, target: Target) -> int:
    action = args.files_command or "list"
    async with Client(target) as client:
        if action == "list":
            return await _list(
                client,
                args,
                "files",
                {"purpose": args.purpose} if args.purpose else {},
                ["ID", "PURPOSE", "BYTES", "CREATED", "FILENAME"],
                lambda f: [
                    f["id"],
                    f.get("purpose") or "",
                    human_bytes(f.get("bytes") or 0),
                    human_time(f.get("created_at")),
                    f.get("filename") or "",
                ],
            )
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
            n = await client.download(args.id, dest, overwrite=args.force)
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
    table = [
        [
            r["date"],
            r["provider"],
            r["model"],
            str(r["requests"]),
            str(r["input_tokens"]),
            str(r["input_tokens_details"]["cached_tokens"]),
            str(r["output_tokens"]),
            str(r["output_tokens_details"]["reasoning_tokens"]),
            str(r["total_tokens"]),
        ]
        for r in rows
    ]
    total = [sum(int(row[i]) for row in table) for i in range(3, 9)]
    table.append(["total", "", "", *map(str, total)])
    print(
        "\n".join(
            text_table(
                ["DATE", "PROVIDER", "MODEL", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "REASONING", "TOTAL"], table
            )
        )
    )
    return EXIT_OK


# ----------------------------------------------------------------------------- argparse wiring
CLIENT_ENV = """\
environment:
  SLUICE_URL      Sluice's URL, with or without /v1 (--url wins)
  SLUICE_TOKEN    the API token (--token wins)
  When neither is set, the `sluice up` stack running here is used: its $SLUICE_DATA_DIR/stack.json
  (SLUICE_DATA_DIR defaults to ./var/data; this checkout's var/data is looked at too), and a line
  on stderr says so. Otherwise http://localhost:8000 and the token in $SLUICE_DATA_DIR/dev-token.
  The client never reads OPENAI_API_KEY.
"""
SUBMIT_MORE = (
    """\
With --wait, FILE is checked line by line first (nothing is uploaded when a line is invalid or a
custom_id appears twice), then run as one batch, or as several when it holds more requests or
bytes than one batch may on the server, at most --parallel at a time. Their results are merged
into DIR/<id>_output.jsonl and DIR/<id>_error.jsonl (<id>: the batch's id, or the job's when
there are several batches). DIR/<job id>.submit.json keeps the job's state until it ends:
after a Ctrl-C, a crash or a reboot, `sluice submit --resume --out DIR` goes on where it
stopped, without running any batch twice.

"""
    + CLIENT_ENV
)


def _common(parser: argparse.ArgumentParser) -> None:
    """Connection and output options, accepted at every level (``sluice batches --json list`` or after)."""
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--url",
        "--api-base",
        "-b",
        dest="url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"Sluice's URL, with or without /v1 (default: $SLUICE_URL, else the `sluice up` stack, "
        f"else {DEFAULT_URL})",
    )
    g.add_argument(
        "--token",
        "--api-key",
        "-k",
        dest="token",
        default=argparse.SUPPRESS,
        metavar="TOKEN",
        help="API token (default: $SLUICE_TOKEN, else the `sluice up` stack's)",
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API objects as JSON (for scripts)"
    )


def _list_options(parser: argparse.ArgumentParser, kind: str, limit: str) -> None:
    # SUPPRESS: an option given before the subcommand (`sluice batches --limit 2 list`) is not
    # overwritten by the subcommand's default; the defaults are set once, on `batches` / `files`.
    if kind == "files":
        parser.add_argument(
            "--purpose",
            choices=sorted(set(UPLOAD_PURPOSES) | {"batch_output"}),
            default=argparse.SUPPRESS,
            help="only files of this purpose",
        )
    parser.add_argument("--limit", type=int, default=argparse.SUPPRESS, metavar="N", help=f"how many ({limit})")
    parser.add_argument("--after", default=argparse.SUPPRESS, metavar="ID", help="the page after this id")


def _parser(sub: Any, name: str, summary: str, description: str, epilog: str = CLIENT_ENV) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 78),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_client_commands(sub: Any) -> None:
    """Add ``submit``, ``batches``, ``files`` and ``usage`` to the ``sluice`` subparsers."""
    submit = _parser(
        sub,
        "submit",
        "upload a JSONL file and create a batch (--wait: follow it, get results)",
        "Upload a batch input file and create a batch from it; with --wait, follow it to its end and save its results.",
        SUBMIT_MORE,
    )
    submit.add_argument("file", nargs="?", help="the JSONL file of requests")
    submit.add_argument(
        "--endpoint",
        "-e",
        choices=BATCH_ENDPOINTS,
        metavar="ENDPOINT",
        help="the batch endpoint (default: the first line's url, else /v1/chat/completions)",
    )
    submit.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE", help="batch metadata (repeatable)")
    submit.add_argument(
        "--wait", "-w", action="store_true", help="follow the batch (or batches) until it ends, then save the results"
    )
    submit.add_argument(
        "--out",
        "-o",
        default=".",
        metavar="DIR",
        help="with --wait or --resume: where the result files and the job's state go (default: .)",
    )
    submit.add_argument(
        "--resume",
        action="store_true",
        help="go on with the interrupted submit --wait kept in DIR (FILE may name which)",
    )
    submit.add_argument(
        "--parallel",
        type=int,
        default=jobs.DEFAULT_PARALLEL,
        metavar="N",
        help=f"batches of one job running at a time (default {jobs.DEFAULT_PARALLEL})",
    )
    submit.add_argument(
        "--max-batch-lines",
        type=int,
        default=None,
        metavar="N",
        help="at most N requests per batch (default: the server's limit)",
    )
    submit.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    submit.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)  # no event stream, poll only
    submit.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _common(submit)
    submit.set_defaults(func=_run(cmd_submit))

    batches = _parser(
        sub,
        "batches",
        "list, show or cancel batches",
        "List the newest batches (the default: `sluice batches --limit 5`), show one or cancel one.",
    )
    _common(batches)
    _list_options(batches, "batches", "1..100, default 20")
    bsub = batches.add_subparsers(dest="batches_command", metavar="{list,get,cancel,retry}")
    bl = _parser(bsub, "list", "the newest batches (the default action)", "The newest batches, newest first.")
    _list_options(bl, "batches", "1..100, default 20")
    _common(bl)
    for name, text in (("get", "one batch, with its counts and errors"), ("cancel", "cancel a batch")):
        p = _parser(bsub, name, text, text[0].upper() + text[1:] + ".")
        p.add_argument("id", metavar="BATCH_ID")
        _common(p)
    rp = _parser(
        bsub,
        "retry",
        "rerun a finished batch's retryable failures as a new batch",
        "Create a batch of the requests of a finished batch that failed in a way worth another try (429 "
        "or 5xx answers, timeouts, unreachable provider, batch_expired, batch_cancelled; never a 4xx). "
        "With --wait, follow it to its end and merge its results into the original's output and error "
        "files in DIR (every custom_id once, its latest attempt), downloading them first if needed.",
    )
    rp.add_argument("id", metavar="BATCH_ID")
    rp.add_argument("--wait", "-w", action="store_true", help="follow the new batch and merge its results")
    rp.add_argument(
        "--out",
        "-o",
        default=".",
        metavar="DIR",
        help="with --wait: where the original's result files are (or go); default .",
    )
    rp.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    rp.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _common(rp)
    batches.set_defaults(func=_run(cmd_batches), limit=20, after=None)

    files = _parser(
        sub,
        "files",
        "list, show, download or delete files",
        "List the newest files (the default: `sluice files --purpose batch --limit 5`), show, download or delete one.",
    )
    _common(files)
    _list_options(files, "files", "1..10000, default 100")
    fsub = files.add_subparsers(dest="files_command", metavar="{list,get,download,delete}")
    fl = _parser(fsub, "list", "the newest files (the default action)", "The newest files, newest first.")
    _list_options(fl, "files", "1..10000, default 100")
    _common(fl)
    for name, text in (
        ("get", "one file's details"),
        ("download", "save a file's content"),
        ("delete", "delete a file"),
    ):
        p = _parser(fsub, name, text, text[0].upper() + text[1:] + ".")
        p.add_argument("id", metavar="FILE_ID")
        if name == "download":
            p.add_argument(
                "--output",
                "-o",
                metavar="PATH",
                help="where to save it: a path, a directory, or - for stdout (default: its filename)",
            )
            p.add_argument("--force", "-f", action="store_true", help="replace a file that exists already")
        _common(p)
    files.set_defaults(func=_run(cmd_files), limit=100, after=None, purpose=None, output=None, force=False)

    usage = sub.add_parser(
        "usage",
        help="tokens used by this token, by day, provider and model",
        description="Tokens used by the API token, by UTC day, provider and model.",
    )
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
