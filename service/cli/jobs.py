"""``sluice submit --wait``: a job of one or more batches, followed to its end, its results merged, resumable.

A file bigger than one batch of the server (service/cli/scan.py cuts it into parts) runs as
several batches, at most ``--parallel`` at a time; one that fits runs as one. The job's state
lives in ``DIR/<job id>.submit.json``, written atomically at every step that matters: a part's
upload, its batch, and the merge of its results into the job's output and error files. So a
submit stopped at any point (Ctrl-C, SIGKILL, a reboot) resumes with ``sluice submit --resume``
without uploading, running or merging any part twice:

- a part is uploaded once: the time its upload started is saved first, and on resume a file of
  the part's name and size created since then is taken instead of uploading again;
- its batch is created once, the same way (a batch of the part's file created since then);
- its results are appended once: the sizes of the merged files are saved before the append and
  the files are cut back to them if the append was interrupted.

Result files are named as the server names a batch's (service/core/results.py): the batch id for
a job of one batch, the job id for a job of several.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from service.core.results import RESULT_KINDS, abort_line, result_filename
from service.core.wire import TERMINAL_STATUSES

from .display import (
    Progress,
    Rate,
    describe_failure,
    human_bytes,
    human_duration,
    print_batch_errors,
    print_json,
    progress_bar,
    progress_text,
)
from .http import (
    CONNECTION_GRACE_S,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    APIStatusError,
    Client,
    ClientError,
)

STATE_SUFFIX = ".submit.json"
DEFAULT_PARALLEL = 4
BIG_FILE_BYTES = 1024 * 1024  # uploads at least this big get a progress display
# A refusal that ends when one of the job's own batches ends: wait for it, then try again.
QUOTA_WAIT_CODES = frozenset({"active_batches_quota_exceeded", "enqueued_lines_quota_exceeded"})
# Kept with each part's batch so a job's batches can be told apart (and counted) in `sluice batches`.
JOB_METADATA, PART_METADATA = "sluice_job", "sluice_part"
MAX_METADATA = 16


class PartState(msgspec.Struct, kw_only=True):
    """One part of the input file and what became of it."""

    index: int
    start: int  # bytes of the input file
    end: int
    lines: int
    first_line: int
    upload_name: str
    uploading_at: float | None = None  # set before the upload: on resume, look for a file uploaded since
    file_id: str | None = None
    creating_at: float | None = None  # set before POST /batches: on resume, look for a batch created since
    batch_id: str | None = None
    status: str | None = None  # the batch's last status seen; "cancelled" for a part a cancel kept from starting
    counts: dict[str, int] = {}
    output_file_id: str | None = None
    error_file_id: str | None = None
    merging: dict[str, int] | None = None  # sizes of the merged files before this part's results were appended
    merged: bool = False


class JobState(msgspec.Struct, kw_only=True):
    """What ``DIR/<job id>.submit.json`` holds."""

    version: int = 1
    job_id: str
    input: str  # absolute path of the input file
    input_size: int
    input_mtime_ns: int
    endpoint: str
    metadata: dict[str, str] = {}
    url: str  # the server it runs on
    total: int
    created_at: float
    cancelled: bool = False
    parts: list[PartState]

    @property
    def single(self) -> bool:
        return len(self.parts) == 1

    def result_path(self, out_dir: Path, kind: str) -> Path:
        """Where the job's merged output or error file goes."""
        owner = self.parts[0].batch_id if self.single and self.parts[0].batch_id else self.job_id
        return out_dir / result_filename(owner, kind)


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def state_path(out_dir: Path, job_id: str) -> Path:
    return out_dir / f"{job_id}{STATE_SUFFIX}"


def save(path: Path, state: JobState) -> None:
    """Write the state atomically and durably: a crash leaves the old state or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(state)) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> JobState:
    try:
        return msgspec.json.decode(path.read_bytes(), type=JobState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ClientError(f"cannot read the state of a submit from {path}: {exc}") from None


def unfinished(out_dir: Path) -> list[tuple[Path, JobState]]:
    """The state files of submits in ``out_dir`` (a finished submit removes its own)."""
    if not out_dir.is_dir():
        return []
    return [(p, load(p)) for p in sorted(out_dir.glob(f"job_*{STATE_SUFFIX}"))]


def file_signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------- waiting and Ctrl-C
class Interrupts:
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


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


def ask(question: str) -> bool:
    """Ask on the terminal; Ctrl-C or end of input at the prompt count as no."""
    # The prompt goes to stderr (stdout may be redirected to a file), the answer comes from the terminal.
    sys.stderr.write(f"{question} [y/N] ")
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
        async with client._session.get(
            url,
            headers={"Accept": "text/event-stream"},
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
        ) as resp:
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


# ----------------------------------------------------------------------------- creating a batch
async def create_batch(client: Client, body: dict[str, Any], file_id: str) -> dict[str, Any]:
    """POST /batches; when the server refuses it, delete the file the CLI uploaded for it and say so.

    Nothing is left behind for a batch that will not run, so a refused batch never costs storage
    quota. When the answer is lost (the server unreachable), the batch may exist: the file stays.
    """
    try:
        return await client.request("POST", "/batches", json=body)
    except APIStatusError as exc:
        raise await refused(client, exc, file_id) from None


async def refused(client: Client, exc: APIStatusError, file_id: str) -> ClientError:
    """The error for a refused batch, after deleting the file uploaded for it (a 5xx may hide a batch: kept)."""
    if exc.status >= 500:
        return ClientError(
            f"{exc.message}\nthe uploaded file {file_id} stays on the server "
            f"(`sluice files delete {file_id}` deletes it)"
        )
    try:
        await client.request("DELETE", f"/files/{file_id}")
        left = f"deleted the uploaded file {file_id}: nothing is left on the server"
    except ClientError:
        left = f"the uploaded file {file_id} stays on the server (`sluice files delete {file_id}` deletes it)"
    return APIStatusError(f"the batch was refused: {exc.message}\n{left}", exc.status, exc.body)


# ----------------------------------------------------------------------------- the job
class Job:
    """Runs a job to its end (or until interrupted), merging each part's results as it ends."""

    def __init__(
        self, client: Client, state: JobState, path: Path, args: argparse.Namespace, *, parallel: int = DEFAULT_PARALLEL
    ) -> None:
        self.client = client
        self.state = state
        self.path = path
        self.args = args
        self.out_dir = path.parent
        self.local = Path(state.input)
        self.parallel = max(1, parallel)
        self.err = sys.stderr
        self.batches: dict[int, dict[str, Any]] = {}  # part index -> latest batch object
        self.trackers: dict[int, dict[str, Any]] = {}  # part index -> {"batch": ..., "task": ...}
        self.wake = asyncio.Event()
        self.rate = Rate()
        self.cancelled_by_us = False
        self.quota_note = ""
        self.quota_blocked: int | None = None  # parts ended when a quota refused the next batch
        self.unreachable_since: float | None = None

    # -- helpers
    def note(self, text: str) -> None:
        if not self.args.quiet:
            self._end_line()
            print(text, file=self.err, flush=True)

    def save(self) -> None:
        save(self.path, self.state)

    def running(self) -> list[PartState]:
        return [p for p in self.state.parts if p.batch_id and p.status not in TERMINAL_STATUSES]

    def ended(self) -> int:
        return sum(1 for p in self.state.parts if p.status in TERMINAL_STATUSES)

    def label(self, part: PartState) -> str:
        return "" if self.state.single else f" of part {part.index + 1}/{len(self.state.parts)}"

    # -- starting parts
    async def reconcile(self) -> None:
        """After a crash: find a part's upload or batch that was made but not yet written down."""
        for part in self.state.parts:
            if part.file_id is None and part.uploading_at is not None:
                page = await self.client.request("GET", "/files", params={"purpose": "batch", "limit": "10000"})
                for f in page.get("data", []):
                    if (
                        f.get("filename") == part.upload_name
                        and f.get("bytes") == part.end - part.start
                        and (f.get("created_at") or 0) >= int(part.uploading_at) - 1
                    ):
                        part.file_id = f["id"]
                        break
                part.uploading_at = None if part.file_id is None else part.uploading_at
                self.save()
            if part.batch_id is None and part.creating_at is not None and part.file_id is not None:
                after: str | None = None
                found = None
                while found is None:
                    params = {"limit": "100", **({"after": after} if after else {})}
                    page = await self.client.request("GET", "/batches", params=params)
                    data = page.get("data", [])
                    found = next((b for b in data if b.get("input_file_id") == part.file_id), None)
                    if (
                        not page.get("has_more")
                        or not data
                        or (data[-1].get("created_at") or 0) < int(part.creating_at) - 1
                    ):
                        break
                    after = data[-1]["id"]
                if found is not None:
                    part.batch_id, part.status = found["id"], found["status"]
                    self.batches[part.index] = found
                else:
                    part.creating_at = None
                self.save()

    async def start_parts(self) -> None:
        """Upload parts and create their batches while fewer than ``parallel`` run."""
        if self.quota_blocked is not None and self.ended() <= self.quota_blocked:
            return
        self.quota_blocked = None
        for part in self.state.parts:
            if self.state.cancelled or len(self.running()) >= self.parallel:
                return
            if part.batch_id is not None or part.status == "cancelled":
                continue
            if part.file_id is None:
                await self.upload(part)
            body: dict[str, Any] = {
                "input_file_id": part.file_id,
                "endpoint": self.state.endpoint,
                "completion_window": "24h",
            }
            metadata = dict(self.state.metadata)
            if not self.state.single and len(metadata) + 2 <= MAX_METADATA:
                metadata.update(
                    {JOB_METADATA: self.state.job_id, PART_METADATA: f"{part.index + 1}/{len(self.state.parts)}"}
                )
            if metadata:
                body["metadata"] = metadata
            part.creating_at = time.time()
            self.save()
            try:
                assert part.file_id is not None
                if self.running() and not self.state.single:
                    batch = await self._create_or_wait(part, body)
                    if batch is None:
                        return
                else:
                    batch = await create_batch(self.client, body, part.file_id)
            except APIStatusError:
                part.file_id, part.uploading_at, part.creating_at = None, None, None
                self.save()
                raise
            part.batch_id, part.status = batch["id"], batch["status"]
            self.batches[part.index] = batch
            self.quota_note = ""
            self.save()
            self.note(
                f"created batch {batch['id']}{self.label(part)} (endpoint {self.state.endpoint})"
                + ("; waiting for it to end, Ctrl-C to stop" if self.state.single else "")
            )

    async def _create_or_wait(self, part: PartState, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the part's batch; None when a quota refuses it until one of the job's batches ends."""
        try:
            return await self.client.request("POST", "/batches", json=body)
        except APIStatusError as exc:
            if exc.status == 429 and exc.body.get("code") in QUOTA_WAIT_CODES:
                part.creating_at = None
                self.save()
                self.quota_blocked = self.ended()
                if not self.quota_note:
                    self.quota_note = exc.body.get("code") or "quota"
                    self.note(f"part {part.index + 1} waits for a batch of this job to end ({self.quota_note})")
                return None
            assert part.file_id is not None
            raise await refused(self.client, exc, part.file_id) from None

    async def upload(self, part: PartState) -> None:
        size = part.end - part.start
        progress = None
        if size >= BIG_FILE_BYTES and not self.args.quiet:
            self._end_line()
            what = self.local.name if self.state.single else f"part {part.index + 1}/{len(self.state.parts)}"
            progress = Progress(f"uploading {what}", size, self.err)
        part.uploading_at = time.time()
        self.save()
        uploaded = await self.client.upload(
            self.local, "batch", progress, start=part.start, end=part.end, filename=part.upload_name
        )
        if progress is not None:
            progress.finish()
        part.file_id = uploaded["id"]
        self.save()
        what = "" if self.state.single else f" part {part.index + 1}/{len(self.state.parts)} of"
        self.note(
            f"uploaded{what} {self.local} ({human_bytes(uploaded['bytes'])}"
            + ("" if self.state.single else f", {part.lines} requests")
            + f") as {uploaded['id']}"
        )

    # -- following
    def follow(self, part: PartState) -> None:
        if self.args.poll or part.index in self.trackers or not part.batch_id:
            return
        holder: dict[str, Any] = {"batch": self.batches.get(part.index)}
        holder["task"] = asyncio.create_task(follow_events(self.client, part.batch_id, holder, self.wake))
        self.trackers[part.index] = holder

    async def refresh(self) -> None:
        """Bring every running part's batch up to date: from its event stream, else by polling."""
        for part in self.running():
            assert part.batch_id is not None
            self.follow(part)
            holder = self.trackers.get(part.index)
            if holder is not None and holder.get("batch") is not None:
                self.batches[part.index] = holder["batch"]
            if holder is None or holder["task"].done() or part.index not in self.batches:
                try:
                    self.batches[part.index] = await self.client.request("GET", f"/batches/{part.batch_id}")
                    self.unreachable_since = None
                except APIStatusError as exc:
                    if exc.status < 500 and exc.status != 429:
                        raise
                    # A restarting web process: keep following.
                except ClientError:
                    self.unreachable_since = self.unreachable_since or time.monotonic()
                    if time.monotonic() - self.unreachable_since > CONNECTION_GRACE_S:
                        raise
            batch = self.batches.get(part.index)
            if batch is not None:
                self._take(part, batch)

    @staticmethod
    def _take(part: PartState, batch: dict[str, Any]) -> None:
        part.status = batch["status"]
        part.counts = dict(batch.get("request_counts") or {})
        part.output_file_id = batch.get("output_file_id")
        part.error_file_id = batch.get("error_file_id")

    # -- merging
    def _prepare_merge(self, part: PartState) -> dict[str, Path]:
        paths = {kind: self.state.result_path(self.out_dir, kind) for kind in RESULT_KINDS}
        if part.merging is None:
            part.merging = {kind: (p.stat().st_size if p.exists() else 0) for kind, p in paths.items()}
            self.save()
        else:
            # An append of this part was interrupted: cut the files back to where it started.
            for kind, p in paths.items():
                if p.exists() and p.stat().st_size > part.merging[kind]:
                    with open(p, "r+b") as f:
                        f.truncate(part.merging[kind])
        return paths

    async def merge(self, part: PartState) -> None:
        """Append a finished part's result files to the job's (once, even across a crash)."""
        paths = self._prepare_merge(part)
        batch = self.batches.get(part.index) or {}
        if batch.get("errors") and batch["errors"].get("data"):
            self._end_line()
            print_batch_errors(batch, self.local, self.err, line_offset=part.first_line - 1)
        for kind, file_id in (("output", part.output_file_id), ("error", part.error_file_id)):
            if file_id:
                # Opening and fsync go to a thread: other parts upload and poll on this loop meanwhile.
                with await asyncio.to_thread(open, paths[kind], "ab") as f:
                    await self.client.copy_content(file_id, f)
                    await asyncio.to_thread(os.fsync, f.fileno())
        part.merged = True
        part.merging = None
        self.save()

    def _write_cancelled(self, part: PartState, error_path: Path) -> None:
        """Append a ``batch_cancelled`` error line for each request of ``part`` (blocking file I/O)."""
        with open(self.local, "rb") as src, open(error_path, "ab") as out:
            src.seek(part.start)
            left = part.end - part.start
            while left > 0 and (raw := src.readline(left)):
                left -= len(raw)
                line = raw.strip().removeprefix(b"\xef\xbb\xbf")
                if line:
                    out.write(abort_line(msgspec.json.decode(line)["custom_id"], "batch_cancelled") + b"\n")
            out.flush()
            os.fsync(out.fileno())

    async def abort_unstarted(self) -> None:
        """A cancelled job: the lines of parts that never ran get ``batch_cancelled`` error lines, as a batch's would."""
        for part in self.state.parts:
            if part.batch_id is not None or part.merged:
                continue
            paths = self._prepare_merge(part)
            await asyncio.to_thread(self._write_cancelled, part, paths["error"])
            part.status, part.counts = "cancelled", {"total": part.lines, "completed": 0, "failed": part.lines}
            part.merged, part.merging = True, None
            self.save()
            if part.file_id:
                try:
                    await self.client.request("DELETE", f"/files/{part.file_id}")
                except ClientError:
                    pass

    # -- display
    def counts(self) -> tuple[int, int]:
        completed = sum(p.counts.get("completed", 0) for p in self.state.parts)
        failed = sum(p.counts.get("failed", 0) for p in self.state.parts)
        return completed, failed

    def status_word(self) -> str:
        if not all(p.merged for p in self.state.parts):
            return "cancelling" if self.state.cancelled else "in_progress"
        statuses = {p.status for p in self.state.parts}
        if statuses == {"completed"}:
            return "completed"
        if "cancelled" in statuses:
            return "cancelled"
        return "failed"

    def progress_line(self, r: float | None) -> str:
        if self.state.single:
            batch = self.batches.get(0)
            if batch is None:
                return f"{self.state.job_id} starting"
            return progress_text(batch, r)
        completed, failed = self.counts()
        done, total = completed + failed, self.state.total
        status = self.status_word()
        text = (
            f"{self.state.job_id} {status}: {done}/{total} ({done / total:.0%}), {completed} completed, {failed} failed"
        )
        if r is not None and status == "in_progress":
            text += f", {r:.1f} req/s"
            if r > 0 and done < total:
                text += f", ETA {human_duration((total - done) / r)}"
        by_status: dict[str, int] = {}
        for p in self.state.parts:
            key = p.status or "not started"
            by_status[key] = by_status.get(key, 0) + 1
        return text + "; batches: " + ", ".join(f"{n} {s}" for s, n in by_status.items())

    _open_line = False
    _last_line, _last_print = "", 0.0

    def draw(self) -> None:
        if self.args.quiet:
            return
        now = time.monotonic()
        completed, failed = self.counts()
        r = self.rate.add(now, completed + failed)
        line = self.progress_line(r)
        if self.err.isatty():
            self.err.write(f"\r{progress_bar(completed + failed, self.state.total)} {line}\x1b[K")
            self.err.flush()
            self._open_line = True
            return
        first = line.split(":")[0]
        if line != self._last_line and (
            now - self._last_print >= 2.0
            or first != self._last_line.split(":")[0]
            or self.status_word() in TERMINAL_STATUSES
        ):
            print(line, file=self.err, flush=True)
            self._last_line, self._last_print = line, now

    def _end_line(self) -> None:
        if self._open_line:
            self.err.write("\n")
            self.err.flush()
            self._open_line = False

    def resume_hint(self) -> str:
        out = self.args.out
        running = [p.batch_id for p in self.running()]
        lines = [f"  resume it (waits, then writes the results): sluice submit --resume --out {out}"]
        for batch_id in running:
            lines.append(f"  follow it: sluice batches get {batch_id}")
        for batch_id in running:
            lines.append(f"  cancel it: sluice batches cancel {batch_id}")
        return "\n".join(lines)

    def detach(self) -> None:
        running = [p.batch_id for p in self.running()]
        state = "is being cancelled" if self.cancelled_by_us else "keeps running"
        if self.state.single and running:
            what = f"batch {running[0]} {state}"
        else:
            what = f"job {self.state.job_id} ({len(running)} of {len(self.state.parts)} batches running) {state}"
        self._end_line()
        print(f"stopped waiting; {what} on the server.\n{self.resume_hint()}", file=self.err, flush=True)

    # -- the loop
    async def on_interrupt(self) -> bool:
        """Ctrl-C: True to stop waiting (after saying how to resume), False to go on."""
        self._end_line()
        if self.cancelled_by_us or not interactive():
            self.detach()
            return True
        running = self.running()
        if self.state.single:
            question = f"Cancel batch {running[0].batch_id}?" if running else "Cancel it?"
        else:
            waiting = sum(1 for p in self.state.parts if p.batch_id is None and not p.merged)
            question = f"Cancel job {self.state.job_id} ({len(running)} running batches, {waiting} not started)?"
        self.interrupts.remove()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yes = ask(question)
        finally:
            self.interrupts.install()
        if not yes:
            self.detach()
            return True
        self.state.cancelled = True
        self.save()
        for part in running:
            try:
                self._take(part, await self.client.request("POST", f"/batches/{part.batch_id}/cancel"))
                self.batches[part.index] = await self.client.request("GET", f"/batches/{part.batch_id}")
            except APIStatusError as exc:
                if exc.status != 409:
                    raise
                print(f"too late to cancel {part.batch_id}: {exc.body.get('message')}", file=self.err)
        self.cancelled_by_us = True
        print(
            f"cancelling {', '.join(str(p.batch_id) for p in running) or self.state.job_id}; waiting for the "
            "partial results (Ctrl-C again to stop waiting)",
            file=self.err,
            flush=True,
        )
        return False

    async def run(self) -> int:
        """Start, follow and merge until every part is merged; the exit code."""
        started = time.monotonic()
        self.interrupts = Interrupts(self.wake)
        self.interrupts.install()
        interval = max(0.05, self.args.poll_interval)
        try:
            await self._loop(interval)
        except ClientError as exc:
            if not any(p.batch_id for p in self.state.parts):
                self.path.unlink(missing_ok=True)  # nothing runs: nothing to resume
                raise
            raise type(exc)(f"{exc.message}\n{self.resume_hint()}", *_extra(exc)) from None
        finally:
            self.interrupts.remove()
            for holder in self.trackers.values():
                holder["task"].cancel()
            await asyncio.gather(*(h["task"] for h in self.trackers.values()), return_exceptions=True)
            self._end_line()
        if self.interrupted:
            return EXIT_INTERRUPTED
        return await self.finish(time.monotonic() - started)

    interrupted = False

    async def _loop(self, interval: float) -> None:
        await self.reconcile()
        while True:
            if self.state.cancelled:
                await self.abort_unstarted()
            else:
                await self.start_parts()
            await self.refresh()
            for part in self.state.parts:
                if not part.merged and part.status in TERMINAL_STATUSES:
                    await self.merge(part)
            self.draw()
            if all(p.merged for p in self.state.parts):
                break
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            self.wake.clear()
            if self.interrupts.hit:
                self.interrupts.hit = False
                if await self.on_interrupt():
                    self.interrupted = True
                    return

    async def finish(self, seconds: float) -> int:
        """Print the summary (or the JSON), forget the state file; the exit code."""
        status = self.status_word()
        paths = {kind: self.state.result_path(self.out_dir, kind) for kind in RESULT_KINDS}
        written = [f"{'errors' if kind == 'error' else kind} {p}" for kind, p in paths.items() if p.exists()]
        files = "; ".join(written) if written else "no result files"
        completed, failed = self.counts()
        code = EXIT_OK if status == "completed" else EXIT_FAILED
        if self.args.json:
            if self.state.single:
                batch_id = self.state.parts[0].batch_id
                print_json(await self.client.request("GET", f"/batches/{batch_id}"))
            else:
                print_json(
                    {
                        "id": self.state.job_id,
                        "object": "sluice.job",
                        "status": status,
                        "request_counts": {"total": self.state.total, "completed": completed, "failed": failed},
                        "batches": [p.batch_id for p in self.state.parts],
                        "output_file": str(paths["output"]) if paths["output"].exists() else None,
                        "error_file": str(paths["error"]) if paths["error"].exists() else None,
                    }
                )
        elif self.state.single:
            part = self.state.parts[0]
            batch = self.batches.get(0) or {}
            if part.status == "failed" and (batch.get("errors") or {}).get("data"):
                print(f"{part.batch_id} failed: {describe_failure(batch)}, nothing was sent upstream; {files}")
            else:
                print(
                    f"{part.batch_id} {part.status}: {completed} completed, {failed} failed of {self.state.total} "
                    f"in {human_duration(seconds)}; {files}"
                )
        else:
            print(
                f"{self.state.job_id} {status}: {completed} completed, {failed} failed of {self.state.total} in "
                f"{human_duration(seconds)} ({len(self.state.parts)} batches); {files}"
            )
        self.path.unlink(missing_ok=True)
        return code


def _extra(exc: ClientError) -> tuple[Any, ...]:
    if isinstance(exc, APIStatusError):
        return exc.status, exc.body
    return (exc.code,)


def new_state(
    job_id: str, local: Path, spans: list[Any], endpoint: str, metadata: dict[str, str], url: str, total: int
) -> JobState:
    """The state of a job that has not started."""
    size, mtime_ns = file_signature(local)
    n = len(spans)
    parts = [
        PartState(
            index=i,
            start=s.start,
            end=s.end,
            lines=s.lines,
            first_line=s.first_line,
            upload_name=local.name if n == 1 else f"{local.stem}.{job_id}.part{i + 1:03d}-of-{n:03d}.jsonl",
        )
        for i, s in enumerate(spans)
    ]
    return JobState(
        job_id=job_id,
        input=str(local.resolve()),
        input_size=size,
        input_mtime_ns=mtime_ns,
        endpoint=endpoint,
        metadata=metadata,
        url=url,
        total=total,
        created_at=time.time(),
        parts=parts,
    )
