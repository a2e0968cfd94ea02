"""``sluice batches retry ID [--wait] [--out DIR]``: rerun a finished batch's retryable failures.

``POST /v1/batches/{id}/retry`` makes the new batch (service/web/retry.py). With ``--wait`` the
command follows it to its end and merges its results into the *original's* output and error
files as saved locally (``DIR/<id>_output.jsonl`` and ``DIR/<id>_error.jsonl``, the names
``sluice submit --wait`` saves them under; downloaded first when they are not there). ``<id>`` is
the first batch of the chain: retrying a retry (``metadata.sluice_retry_of``) merges into the
same files. After the merge every custom_id appears once, in the output file or in the error
file, with its latest attempt: the retried ones' lines are dropped from both files and the new
batch's lines appended to the file of their outcome. Each file is rewritten whole and renamed
into place, so an interrupted merge leaves the previous version; merging the same results again
changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from service.core.results import RESULT_KINDS, result_filename
from service.core.wire import TERMINAL_STATUSES

from .http import EXIT_FAILED, EXIT_OK, APIStatusError, Client, ClientError

RETRY_OF = "sluice_retry_of"
MAX_CHAIN = 100


async def create(client: Client, batch_id: str) -> dict[str, Any]:
    """POST /batches/{id}/retry; a ClientError that says why when there is nothing to retry (400/409)."""
    try:
        return await client.request("POST", f"/batches/{batch_id}/retry")
    except APIStatusError as exc:
        if exc.status in (400, 409):
            raise ClientError(f"cannot retry {batch_id}: {(exc.body or {}).get('message') or exc.message}") from None
        raise


async def root_of(client: Client, batch: dict[str, Any]) -> dict[str, Any]:
    """The first batch of a chain of retries (following ``metadata.sluice_retry_of``)."""
    for _ in range(MAX_CHAIN):
        parent = (batch.get("metadata") or {}).get(RETRY_OF)
        if not parent:
            return batch
        try:
            batch = await client.request("GET", f"/batches/{parent}")
        except APIStatusError as exc:
            if exc.status == 404:
                return batch  # the original is gone (retention): merge into this one's files
            raise
    return batch


async def follow(client: Client, batch_id: str, interval: float, quiet: bool) -> dict[str, Any]:
    """Poll the batch until it ends; a progress line on stderr unless ``quiet``."""
    while True:
        batch = await client.request("GET", f"/batches/{batch_id}")
        counts = batch.get("request_counts") or {}
        if not quiet:
            print(
                f"\r{batch_id} {batch['status']}: {counts.get('completed', 0) + counts.get('failed', 0)}/"
                f"{counts.get('total', 0)}",
                end="",
                file=sys.stderr,
                flush=True,
            )
        if batch["status"] in TERMINAL_STATUSES:
            if not quiet:
                print(file=sys.stderr)
            return batch
        await asyncio.sleep(interval)


def _custom_ids(path: Path) -> Iterator[tuple[str | None, bytes]]:
    """``(custom_id, line)`` for every line of a JSONL result file (None when a line has none)."""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                custom_id = value.get("custom_id") if isinstance(value, dict) else None
            except ValueError:
                custom_id = None
            yield (custom_id if isinstance(custom_id, str) else None), line


def merge(paths: dict[str, Path], new: dict[str, Path]) -> dict[str, int]:
    """Merge a retry's result files (``new``: kind -> path, maybe missing) into the original's (``paths``).

    Returns the lines in each merged file. Only the retried custom_ids are held in memory.
    """
    redone: set[str] = set()
    for path in new.values():
        if path.exists():
            redone.update(cid for cid, _ in _custom_ids(path) if cid is not None)
    written: dict[str, int] = {}
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".merging")
        n = 0
        with open(tmp, "wb") as out:
            if path.exists():
                for cid, line in _custom_ids(path):
                    if cid not in redone:
                        out.write(line + b"\n")
                        n += 1
            if new[kind].exists():
                for _, line in _custom_ids(new[kind]):
                    out.write(line + b"\n")
                    n += 1
            out.flush()
            os.fsync(out.fileno())
        if n or path.exists():
            os.replace(tmp, path)
        else:
            tmp.unlink()
        written[kind] = n
    return written


async def run(client: Client, args: argparse.Namespace) -> int:
    """``sluice batches retry ID``: create the retry; with ``--wait`` follow it and merge its results."""
    made = await create(client, args.id)
    if not args.wait:
        if args.json:
            print(json.dumps(made, indent=2))
        else:
            print(f"{made['id']} {made['status']} (retry of {args.id})")
            print(f"follow it with: sluice batches get {made['id']}", file=sys.stderr)
        return EXIT_OK
    if not args.quiet:
        print(f"{made['id']} retries the failed requests of {args.id}", file=sys.stderr)
    out_dir = Path(args.out)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    root = await root_of(client, await client.request("GET", f"/batches/{args.id}"))
    paths = {kind: out_dir / result_filename(root["id"], kind) for kind in RESULT_KINDS}
    # The original's results as saved by `sluice submit --wait`; fetched now when they are not there.
    for kind, field in (("output", "output_file_id"), ("error", "error_file_id")):
        if not paths[kind].exists() and root.get(field):
            await client.download(root[field], paths[kind])
    done = await follow(client, made["id"], args.poll_interval, args.quiet)
    new = {kind: out_dir / (result_filename(done["id"], kind) + ".retry") for kind in RESULT_KINDS}
    try:
        for kind, field in (("output", "output_file_id"), ("error", "error_file_id")):
            if done.get(field):
                await client.download(done[field], new[kind], overwrite=True)
        counts = merge(paths, new)
    finally:
        for path in new.values():
            path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        c = done.get("request_counts") or {}
        print(
            f"{done['id']} {done['status']}: {c.get('completed', 0)} completed, {c.get('failed', 0)} failed; "
            f"merged into {paths['output']} ({counts['output']} lines) and {paths['error']} ({counts['error']} lines)"
        )
    return EXIT_OK if done["status"] == "completed" else EXIT_FAILED
