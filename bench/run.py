"""Benchmark harness for Sluice: ``python -m bench.run [--scenario NAME] [--smoke] [--lines N]``.

For every scenario it starts a fresh stack on loopback (its own ``redis-server``, ``sluice
mock-provider``, ``sluice web``, N x ``sluice worker`` and ``sluice finalizer``), submits a
generated batch through the public HTTP API exactly as a client would, and measures throughput,
CPU, memory and Redis memory. Then it runs ``bench/reference.py`` (a plain asyncio client) on the
same lines against a freshly started mock with the same latency. The ``cluster`` scenario runs a
batch per shard on a local Redis Cluster instead and reports Redis CPU per node, the balance over
the masters and the ceiling it implies (``bench/cluster.py``), without a reference run.

Results: a table on stdout, ``<out>/bench-<UTC>.json`` and ``<out>/bench-<UTC>.png`` (one subplot
per scenario), copied to ``latest.json`` / ``latest.png``. The exit status is 0 whatever the
targets say (this is a measurement); it is non-zero only when a run broke: a batch that did not
complete, missing or duplicated ids, a process that died, a timeout.

Linux only: CPU and memory are read from /proc. MB means MiB (2**20 bytes) throughout.

This module is the command line; ``scenarios`` (what runs and its targets), ``runs`` (one scenario's
Sluice runs and reference run), ``sampling`` (CPU, memory and Redis samplers) and ``report``
(tables, chart, files) hold the rest. Stacks and processes come from ``tests/support``: every
process runs in its own group, dies with the harness, and anything left at exit is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

from tests.support import processes

from . import runs
from .report import render_scenario, write_outputs
from .runs import new_result, run_scenario
from .scenarios import SCENARIOS, BenchError, Scenario, select_scenarios

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"
DEFAULT_TIMEOUT_S = 600.0
SMOKE_TIMEOUT_S = 180.0

# Set by SIGINT/SIGTERM: tells an interrupt apart from a failure (a timeout is a cancellation too).
INTERRUPTED = threading.Event()


# ============================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Benchmark Sluice against a plain asyncio client."
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"one of {', '.join(SCENARIOS)} or all (repeatable or comma list; default all)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny scenarios that finish in well under a minute")
    parser.add_argument("--lines", type=int, help="override every scenario's line count")
    parser.add_argument(
        "--batches", type=int, help="split the cluster and spread scenarios' lines over this many batches (1-16)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    parser.add_argument("--keep-logs", action="store_true", help="keep process logs under OUT/logs-<timestamp>")
    parser.add_argument(
        "--timeout", type=float, help=f"seconds per scenario ({DEFAULT_TIMEOUT_S:g}; {SMOKE_TIMEOUT_S:g} with --smoke)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more environment for the Sluice processes (repeatable), e.g. "
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 (see bench/otlp_sink.py)",
    )
    args = parser.parse_args(argv)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
        runs.EXTRA_ENV[name] = value
    if args.timeout is None:
        args.timeout = SMOKE_TIMEOUT_S if args.smoke else DEFAULT_TIMEOUT_S
    args.names = [n.strip() for item in (args.scenario or ["all"]) for n in item.split(",") if n.strip()]
    if args.lines is not None and args.lines < 1:
        parser.error("--lines must be >= 1")
    if args.batches is not None and not 1 <= args.batches <= 16:
        parser.error("--batches must be 1..16")
    return args


async def run_all(scenarios: list[Scenario], workdir: Path, log_root: Path, timeout: float) -> list[dict[str, Any]]:
    """Run the scenarios one after the other; a broken one is recorded and the next one still runs."""
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    assert this is not None  # a coroutine runs in a task
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _interrupt, this)
    results = []
    for scenario in scenarios:
        print(f"--- running {scenario.name} ({scenario.lines:,} lines) ...", file=sys.stderr, flush=True)
        result = new_result(scenario)
        try:
            async with asyncio.timeout(timeout):
                await run_scenario(scenario, result, workdir / scenario.name, log_root / scenario.name)
        except Exception as exc:  # record it, keep measuring the others
            if INTERRUPTED.is_set():
                raise asyncio.CancelledError() from exc
            result["error"] = _describe_failure(exc, timeout)
        if INTERRUPTED.is_set():
            raise asyncio.CancelledError()
        print(render_scenario(result) + "\n", flush=True)
        results.append(result)
    return results


def _interrupt(task: asyncio.Task[Any]) -> None:
    # Cancelling unwinds every `with` block, which stops the processes. The flag covers a signal
    # that lands while nothing is awaited (a synchronous teardown), where the cancel would be lost.
    INTERRUPTED.set()
    task.cancel()


def _describe_failure(exc: Exception, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"BenchError: scenario timed out after {timeout:.0f}s"
    if not isinstance(exc, BenchError):
        traceback.print_exc()  # a harness bug: the whole traceback helps
    return f"{type(exc).__name__}: {exc}"


def host_info() -> dict[str, Any]:
    """What the numbers depend on."""
    redis_version = (
        subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        if shutil.which("redis-server")
        else None
    )
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": redis_version,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 unless a run broke (targets never change the exit status)."""
    args = parse_args(argv)
    scenarios = select_scenarios(args.names, smoke=args.smoke, lines=args.lines, batches=args.batches)
    # Every process started from here on carries this run's marker: whatever outlives its stack
    # (it should not) is found and killed at the end.
    run_id = processes.begin_run()
    leaked: dict[int, str] = {}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    log_root = args.out.resolve() / f"logs-{stamp}" if args.keep_logs else workdir / "logs"
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    try:
        results = asyncio.run(run_all(scenarios, workdir, log_root, args.timeout))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        leaked = processes.end_run(run_id)
        shutil.rmtree(workdir, ignore_errors=True)
    # A process that outlived its stack is a harness bug: the run does not count as clean.
    ok = not any(r.get("error") for r in results) and not leaked
    report = {
        "started_at": started,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "ok": ok,
        "mb": "MiB (2**20 bytes)",
        "host": host_info(),
        "scenarios": results,
    }
    json_path, png_path = write_outputs(report, args.out, stamp)
    print(f"results: {json_path}\nchart:   {png_path}")
    if args.keep_logs:
        print(f"logs:    {log_root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
