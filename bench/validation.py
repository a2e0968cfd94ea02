"""Validation benchmark: ``python -m bench.validation [--lines N] [--skip-stack] [--profile OUT]``.

Two measurements of one generated batch file (``bench/scenarios.py``'s request lines, every
``custom_id`` distinct, all valid):

- **validation alone**: the web process's validation step (``Publisher._validate``: reading the
  file from local storage, checking every line, the duplicate ``custom_id`` check, the delegation
  planner), run in this process on a fakeredis, timed with the monotonic clock. Prints lines/s.
  ``--profile OUT`` also writes a cProfile of it to ``OUT`` (read it with ``python -m pstats``).
- **end to end**: a stack started with ``tests/support`` (its own ``redis-server``, mock, web,
  one worker and the finalizer) with the per-batch line limit raised, the file uploaded and the
  batch created through the HTTP API; once it is ``in_progress`` it runs ``--run-s`` more seconds
  (or to the end with ``--complete``), is cancelled, and the web process's peak RSS (``VmHWM``)
  is read from /proc.

Linux only (RSS from /proc). MB means MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import fakeredis

from service.core import leases, store
from service.core.config import Provider, Settings
from service.core.records import BatchRecord
from service.core.storage import LocalStorage
from service.web.publisher import Publisher
from tests.support import processes
from tests.support.mocks import MockSpec
from tests.support.stack import StackFactory

from .runs import TOKEN, Api
from .sampling import RssSampler, memory_mb, sampling
from .scenarios import CHAT_URL, TERMINAL, BenchError, write_batch_file

POLL_S = 0.1


async def validate_alone(path: Path, lines: int, workdir: Path, profile: Path | None) -> dict[str, Any]:
    """Run the validation step on ``path`` in this process; its seconds and lines/s."""
    storage = LocalStorage(workdir / "storage")
    key = "file-bench"
    # Hard-linked into the storage's directory, as an upload would have left it.
    storage_path = workdir / "storage" / "files" / key
    try:
        storage_path.hardlink_to(path)
    except OSError:
        shutil.copyfile(path, storage_path)
    settings = Settings(
        data_dir=workdir / "storage",
        max_batch_lines=max(lines, Settings.max_batch_lines),
        providers=(Provider(name="mock", base_url="http://127.0.0.1:9/v1"),),
    )
    r = cast(store.Redis, fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()))
    publisher = Publisher(r, storage, settings, asyncio.Event(), name="bench")
    h = BatchRecord.from_hash(
        {
            b"id": b"batch_bench",
            b"input_key": key.encode(),
            b"input_file_id": key.encode(),
            b"endpoint": CHAT_URL.encode(),
            b"completion_window": b"24h",
        }
    )
    lease = await leases.take(r, "sluice:{batch_bench}:validator", "bench", publisher.lease_ms)
    assert lease is not None
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.monotonic(), time.process_time()
    if profiler:
        profiler.enable()
    total, _size, _model, errors, _planner = await publisher._validate(h, lease)
    if profiler:
        profiler.disable()
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    if profiler and profile:
        profiler.dump_stats(profile)
    await r.aclose()
    if total != lines or errors:
        raise BenchError(f"validation saw {total} lines and {len(errors)} errors, e.g. {errors[:1]}")
    return {
        "lines": total,
        "seconds": round(seconds, 3),
        "lines_per_s": round(total / seconds),
        "cpu_s": round(cpu, 3),
        "lines_per_cpu_s": round(total / cpu),
    }


async def end_to_end(path: Path, lines: int, workdir: Path, run_s: float, complete: bool) -> dict[str, Any]:
    """Upload ``path`` and run it as a batch on a fresh stack; the web process's peak RSS."""
    factory = StackFactory(workdir / "stack")
    try:
        stack = factory.start(
            name="validation",
            workers=1,
            worker_concurrency=32,
            tokens=(TOKEN,),
            mock=MockSpec(latency_ms=0),
            upstream_suffix="/v1",
            max_batch_lines=max(lines, 50_000),
            env={"SLUICE_LOG_LEVEL": "warning", "SLUICE_MAX_BATCH_LINES": str(max(lines, 50_000))},
        )
        stack.wait_ready()
        web = stack.process("web")
        idle = memory_mb(web.pid)
        rss = RssSampler({"web": web})
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(timeout=timeout) as session, sampling(POLL_S, rss.sample):
            api = Api(session, stack.base_url, stack.runner)
            started = time.monotonic()
            uploaded = await api.upload(path)
            upload_s = time.monotonic() - started
            batch = await api.create_batch(uploaded["id"])
            created = time.monotonic()
            in_progress_s = None
            while batch["status"] not in TERMINAL:
                await asyncio.sleep(POLL_S)
                stack.runner.check_alive()
                batch = await api.batch(batch["id"])
                if batch["status"] == "validating":
                    continue
                if in_progress_s is None:
                    in_progress_s = time.monotonic() - created
                if not complete and time.monotonic() - created - in_progress_s >= run_s:
                    batch = await api.call("POST", f"/v1/batches/{batch['id']}/cancel")
                    complete = True  # now wait for the cancellation to end it
            if batch["status"] not in ("completed", "cancelled"):
                raise BenchError(f"batch {batch['id']} ended {batch['status']}: {batch.get('errors')}")
        report = rss.report()["web"]
        counts = batch["request_counts"]
        return {
            "upload_s": round(upload_s, 2),
            "create_to_in_progress_s": _round(in_progress_s),
            "status": batch["status"],
            "completed": counts["completed"],
            "failed": counts["failed"],
            "web_idle_rss_mb": round(idle["VmRSS"], 1),
            "web_peak_rss_mb": report["hwm"],
            "web_max_sampled_rss_mb": report["max_sampled"],
        }
    finally:
        factory.close()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print them as JSON; 0 unless a run broke."""
    parser = argparse.ArgumentParser(prog="python -m bench.validation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="request lines in the file (default 1000000)")
    parser.add_argument("--line-bytes", type=int, help="pad every line to about this many bytes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the validation alone (the best is kept)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the validation alone here")
    parser.add_argument("--skip-stack", action="store_true", help="only the validation alone")
    parser.add_argument(
        "--run-s",
        type=float,
        default=10.0,
        help="seconds to run the batch once in_progress, before cancelling it (default 10)",
    )
    parser.add_argument("--complete", action="store_true", help="run the batch to the end instead")
    args = parser.parse_args(argv)
    run_id = processes.begin_run()
    leaked: dict[int, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-validation-"))
    try:
        path = workdir / "input.jsonl"
        size = write_batch_file(path, args.lines, args.line_bytes)
        result: dict[str, Any] = {"lines": args.lines, "file_mb": round(size / 2**20, 1)}
        runs = [
            asyncio.run(validate_alone(path, args.lines, workdir / f"alone-{i}", args.profile))
            for i in range(args.repeat)
        ]
        result["validation_alone"] = max(runs, key=lambda r: r["lines_per_s"])
        result["validation_alone_runs"] = [r["lines_per_s"] for r in runs]
        print(json.dumps(result), file=sys.stderr, flush=True)
        if not args.skip_stack:
            result["end_to_end"] = asyncio.run(end_to_end(path, args.lines, workdir, args.run_s, args.complete))
    except BenchError as exc:
        print(f"bench.validation: {exc}", file=sys.stderr)
        return 1
    finally:
        leaked = processes.end_run(run_id)
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
