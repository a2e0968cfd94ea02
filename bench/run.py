"""Benchmark harness for Sluice: ``python -m bench.run [--scenario NAME] [--smoke] [--lines N]``.

For every scenario it starts a fresh stack on loopback (its own ``redis-server``, ``sluice
mock-provider``, ``sluice web``, N x ``sluice worker`` and ``sluice finalizer``), submits a
generated batch through the public HTTP API exactly as a client would, and measures throughput,
CPU, memory and Redis memory. Then it runs ``bench/reference.py`` (a plain asyncio client) on the
same lines against a freshly started mock with the same latency.

Results: a table on stdout, ``<out>/bench-<UTC>.json`` and ``<out>/bench-<UTC>.png`` (one subplot
per scenario), copied to ``latest.json`` / ``latest.png``. The exit status is 0 whatever the
targets say (this is a measurement); it is non-zero only when a run broke: a batch that did not
complete, missing or duplicated ids, a process that died, a timeout.

Linux only: CPU and memory are read from /proc. MB means MiB (2**20 bytes) throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "reference.py"
DEFAULT_OUT = ROOT / "bench" / "results"

MIB = 1024 * 1024
CHAT_URL = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
TOKEN = "sk-bench-token"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
STATE_ORDER = ("validating", "in_progress", "finalizing", "completed")

POLL_S = 0.1
PROC_SAMPLE_S = 0.1
REDIS_SAMPLE_S = 0.05
STOP_GRACE_S = 10.0
STARTUP_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 20.0
AFTER_DELETE_WAIT_S = 1.0
DEFAULT_TIMEOUT_S = 600.0
LOG_TAIL_LINES = 40
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The run itself broke: the measurement is invalid, not merely slow."""


# Set by SIGINT/SIGTERM: tells an interrupt apart from a failure (a timeout is a cancellation too).
INTERRUPTED = threading.Event()
# More environment for every Sluice process (--env NAME=VALUE), e.g. to turn tracing on.
EXTRA_ENV: dict[str, str] = {}


# ============================================================================ scenarios


@dataclass(frozen=True)
class Scenario:
    """One benchmark: a batch shape, a stack shape and the targets it is judged against."""

    name: str
    description: str
    lines: int
    latency_ms: float
    worker_counts: tuple[int, ...]  # one Sluice run per entry (scaling compares them)
    worker_concurrency: int
    reference_concurrency: int
    targets: Callable[[dict[str, Any]], list[dict[str, Any]]]
    line_bytes: int | None = None  # pad every line to about this size


def check(target: str, measured: float | None, op: str, threshold: float, unit: str = "") -> dict[str, Any]:
    """One target: ``measured op threshold``; a missing measurement fails."""
    ok = measured is not None and (measured >= threshold if op == ">=" else measured <= threshold)
    value = None if measured is None else round(measured, 4)
    return {"target": target, "measured": value, "op": op, "threshold": threshold, "unit": unit, "pass": ok}


def _latency_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [check("Sluice lines/s vs reference", result["ratios"]["lines_per_s"], ">=", 0.95, "x")]


def _overhead_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = result["ratios"]
    return [
        check("CPU/line Sluice+Redis vs reference", ratios["cpu_per_line"], "<=", 2.5, "x"),
        check("Sluice lines/s vs reference", ratios["lines_per_s"], ">=", 0.5, "x"),
    ]


def _bigfile_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    run = result["sluice_runs"][-1]
    rss = run["rss_mb"]
    checks = [
        check("upload+validation+publish MB/s", run["ingest_mb_per_s"], ">=", 60, "MB/s"),
        check("web peak RSS", rss["web"]["hwm"], "<=", 150, "MB"),
    ]
    for name in sorted(n for n in rss if n.startswith("worker") or n == "finalizer"):
        checks.append(check(f"{name} peak RSS", rss[name]["hwm"], "<=", 120, "MB"))
    redis_mem = run["redis_memory_mb"]
    checks.append(check("Redis peak used_memory above idle", redis_mem["peak_minus_idle"], "<=", 64, "MB"))
    after = redis_mem["after_minus_idle"]
    checks.append(check("Redis used_memory after delete, |after - idle|", None if after is None else abs(after),
                        "<=", 2, "MB"))
    return checks


def _scaling_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [check("lines/s 2 workers vs 1 worker", result["ratios"].get("scaling"), ">=", 1.8, "x")]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("latency", "provider latency bound", 20_000, 200, (2,), 64, 128, _latency_targets),
        Scenario("overhead", "no provider latency: Sluice's own cost", 50_000, 0, (2,), 32, 64, _overhead_targets),
        Scenario("bigfile", "~4 KB lines, ~190 MB file", 50_000, 0, (2,), 32, 64, _bigfile_targets, line_bytes=4000),
        Scenario("scaling", "1 worker, then 2 workers", 12_800, 200, (1, 2), 64, 128, _scaling_targets),
    )
}


def smoke_variant(scenario: Scenario) -> Scenario:
    """A tiny version of ``scenario`` that only proves the harness works end to end."""
    lines = 200 if scenario.name == "bigfile" else 300
    latency = 20 if scenario.latency_ms else 0
    return dataclasses.replace(scenario, lines=lines, latency_ms=latency)


def select_scenarios(names: Iterable[str], *, smoke: bool, lines: int | None) -> list[Scenario]:
    """Scenarios named on the command line (``all`` for every one), in the canonical order."""
    wanted: set[str] = set()
    for name in names:
        wanted |= set(SCENARIOS) if name == "all" else {name}
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}, all")
    chosen = [s for name, s in SCENARIOS.items() if name in wanted]
    if smoke:
        chosen = [smoke_variant(s) for s in chosen]
    if lines is not None:
        chosen = [dataclasses.replace(s, lines=lines) for s in chosen]
    return chosen


# ============================================================================ input file


def request_line(n: int, line_bytes: int | None = None) -> str:
    """Request line ``n`` (custom_id ``req-n``) as JSON, padded to ``line_bytes`` with its newline."""
    message = {"role": "user", "content": f"Say hello to number {n}."}
    line = {"custom_id": f"req-{n}", "method": "POST", "url": CHAT_URL,
            "body": {"model": MODEL, "messages": [message]}}
    text = json.dumps(line, separators=(",", ":"))
    pad = (line_bytes or 0) - len(text) - 2  # the joining space and the newline
    if pad > 0:
        # Plain ASCII words: no JSON escaping, so the byte count is exact.
        message["content"] += " " + ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad]
        text = json.dumps(line, separators=(",", ":"))
    return text


def write_batch_file(path: Path, lines: int, line_bytes: int | None) -> int:
    """Write the batch input file and return its size in bytes."""
    with open(path, "w", encoding="utf-8") as f:
        for n in range(1, lines + 1):
            f.write(request_line(n, line_bytes) + "\n")
    return path.stat().st_size


class IdCounter:
    """Counts ``custom_id`` s of result lines and checks each expected one appears exactly once."""

    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()

    def add(self, raw: bytes | str) -> None:
        """Count one result line (blank lines are ignored)."""
        if raw.strip():
            self.ids[json.loads(raw)["custom_id"]] += 1

    def verify(self, lines: int, what: str) -> None:
        """Raise :class:`BenchError` unless ``req-1`` .. ``req-<lines>`` each appear exactly once."""
        expected = {f"req-{n}" for n in range(1, lines + 1)}
        missing = expected - self.ids.keys()
        extra = self.ids.keys() - expected
        dupes = [i for i, c in self.ids.items() if c > 1]
        if missing or extra or dupes:
            raise BenchError(
                f"{what}: {len(missing)} custom_id(s) missing {sorted(missing)[:5]}, {len(dupes)} duplicated "
                f"{sorted(dupes)[:5]}, {len(extra)} unexpected {sorted(extra)[:5]} (expected {lines} lines)"
            )


# ============================================================================ /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``, reaped children included, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses; the fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024  # the kernel reports kB
    return found


# ============================================================================ processes


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, stage: int,
                 stdout_path: Path | None = None, oneshot: bool = False) -> None:
        self.name = name
        self.stage = stage
        self.oneshot = oneshot  # ends by itself: its exit is not a death
        self.log_path = log_path
        self.stopping = False
        self._log = open(log_path, "wb")
        self._stdout = open(stdout_path, "wb") if stdout_path else None
        # Its own session: a Ctrl-C at the terminal reaches only the harness, which then stops the
        # stack in order (Sluice processes before the Redis they drain into).
        self.popen = subprocess.Popen(
            argv, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
            stdout=self._stdout or self._log, stderr=self._log, start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the process group, so strays the process left behind go too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        """Name, pid, state and log path."""
        state = "running" if self.alive else f"exited with {self.popen.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log_path})"

    def close(self) -> None:
        """Close the log files (after the process is gone)."""
        for f in (self._log, self._stdout):
            if f is not None and not f.closed:
                f.close()


# Process sets not yet stopped; an exit path that skipped the `with` block still stops them.
_LIVE_SETS: list["ProcessSet"] = []


class ProcessSet:
    """The processes of one stack; leaving the ``with`` block stops them all, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        _LIVE_SETS.append(self)

    def __enter__(self) -> "ProcessSet":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and not INTERRUPTED.is_set() and not issubclass(exc_type, KeyboardInterrupt):
            print(self.tails(), file=sys.stderr, flush=True)
        self.stop()

    def start(self, name: str, argv: list[str], env: dict[str, str], *, stage: int,
              stdout_path: Path | None = None, oneshot: bool = False) -> Proc:
        """Start ``argv``; higher stages are stopped first."""
        proc = Proc(name, argv, env, self.log_dir / f"{name}.log", stage, stdout_path, oneshot)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        """Raise :class:`BenchError` when a process exited although nobody asked it to."""
        dead = [p for p in self.procs if not p.stopping and not p.oneshot and not p.alive]
        if dead:
            hint = ""
            if any(p.popen.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) for p in dead):
                # Sluice processes exit 0 on SIGTERM: a clean exit mid-run means someone signalled them.
                hint = " (a clean exit or a signal: were they stopped from outside the harness, e.g. by pkill?)"
            raise BenchError("process(es) died: " + ", ".join(p.describe() for p in dead) + hint)

    def tails(self) -> str:
        """The log tail of every process, for a failure report."""
        return "\n".join(f"----- {p.describe()} -----\n{p.tail()}" for p in self.procs)

    def stop(self) -> None:
        """SIGTERM each stage (highest first), SIGKILL what is still alive after the grace period."""
        for stage in sorted({p.stage for p in self.procs}, reverse=True):
            group = [p for p in self.procs if p.stage == stage]
            for p in group:
                p.stopping = True
                if p.alive:
                    p.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for p in group:
                try:
                    p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.signal(signal.SIGKILL)
                    p.popen.wait()
                p.close()
        if self in _LIVE_SETS:
            _LIVE_SETS.remove(self)


def stop_all_live() -> None:
    """Stop every process set still running (the last line of defence at exit)."""
    for procs in list(_LIVE_SETS):
        procs.stop()


def free_port() -> int:
    """A loopback TCP port nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sluice_command(*args: str) -> list[str]:
    """The ``sluice`` CLI next to this interpreter (falling back to ``python -m service.cli``)."""
    script = Path(sys.executable).parent / "sluice"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "service.cli", *args]


def clean_env() -> dict[str, str]:
    """Our environment without Sluice settings, so nothing points at the shared Redis."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLUICE_", "OPENAI_")) and k not in ("REDIS_URL", "PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_for(what: str, probe: Callable[[], Awaitable[bool]], procs: ProcessSet,
                   timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``probe`` until it returns True; fail early if a process died, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        with contextlib.suppress(OSError, aiohttp.ClientError, aioredis.RedisError, asyncio.TimeoutError):
            if await probe():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def http_ok(url: str) -> bool:
    """True when GET ``url`` answers 200."""
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        return resp.status == 200


async def start_redis(procs: ProcessSet, workdir: Path) -> tuple[Proc, int]:
    """A private, non-persistent ``redis-server`` on a free port, once it answers PING, and its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH (`make redis-server` installs it)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = procs.start("redis-server", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--dir", str(workdir)], clean_env(), stage=0)

    async def pong() -> bool:
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    await wait_for(f"redis-server on port {port}", pong, procs)
    return proc, port


async def start_mock(procs: ProcessSet, latency_ms: float) -> tuple[Proc, str]:
    """A fresh mock provider, once ``/_mock/stats`` answers, and its root URL."""
    port = free_port()
    proc = procs.start("mock-provider", sluice_command("mock-provider", "--port", str(port), "--latency-ms",
                                                str(latency_ms)), clean_env(), stage=1)
    url = f"http://127.0.0.1:{port}"
    await wait_for("the mock provider", lambda: http_ok(f"{url}/_mock/stats"), procs)
    return proc, url


# ============================================================================ the Sluice stack


@dataclass
class Stack:
    """A running Sluice stack and the processes whose CPU and memory are measured."""

    procs: ProcessSet
    web_url: str
    redis_port: int
    measured: dict[str, Proc]  # web, worker-N, finalizer, redis-server
    mock: Proc


async def start_stack(procs: ProcessSet, scenario: Scenario, workers: int, workdir: Path) -> Stack:
    """Redis, mock, web, ``workers`` workers and the finalizer; returns once the web is ready."""
    redis_proc, redis_port = await start_redis(procs, workdir / "redis")
    mock, mock_url = await start_mock(procs, scenario.latency_ms)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **clean_env(),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SLUICE_UPSTREAM_URL": f"{mock_url}/v1",
        "SLUICE_API_TOKENS": TOKEN,
        "SLUICE_DATA_DIR": str(data_dir),
        "SLUICE_WORKER_CONCURRENCY": str(scenario.worker_concurrency),
        "SLUICE_LOG_LEVEL": "warning",
        # Below our SIGKILL grace, so a graceful stop always gets to finish.
        "SLUICE_SHUTDOWN_GRACE_S": "5",
        **EXTRA_ENV,
    }
    web_port = free_port()
    measured = {"web": procs.start("web", sluice_command("web"), {**env, "PORT": str(web_port)}, stage=2)}
    for i in range(1, workers + 1):
        measured[f"worker-{i}"] = procs.start(f"worker-{i}", sluice_command("worker"), env, stage=2)
    measured["finalizer"] = procs.start("finalizer", sluice_command("finalizer"), env, stage=2)
    measured["redis-server"] = redis_proc
    web_url = f"http://127.0.0.1:{web_port}"
    await wait_for("sluice web to be ready", lambda: http_ok(f"{web_url}/readyz"), procs)
    return Stack(procs, web_url, redis_port, measured, mock)


def cpu_snapshot(procs: dict[str, Proc]) -> dict[str, float]:
    """CPU seconds of every process, by name."""
    return {name: cpu_seconds(p.pid) for name, p in procs.items()}


async def wait_settled(stack: Stack) -> bool:
    """Wait until every process is idle, i.e. done importing and connecting, before timing.

    Nothing in the public API says a worker is up; a process that burns (almost) no CPU over
    half a second has finished starting. Returns False if that never happens (timing still goes on).
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    before = cpu_snapshot(stack.measured)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        stack.procs.check_alive()
        now = cpu_snapshot(stack.measured)
        if all(now[n] - before[n] <= 0.03 for n in now):
            return True
        before = now
    return False


# ============================================================================ sampling


@contextlib.asynccontextmanager
async def sampling(interval: float, sample: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Call ``sample`` every ``interval`` seconds in the background while the block runs."""

    async def loop() -> None:
        while True:
            await sample()
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class RssSampler:
    """Largest ``VmRSS`` seen per process: a cross-check of the kernel's ``VmHWM``."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.max_rss: dict[str, float] = {}

    async def sample(self) -> None:
        """Read every process's current RSS once."""
        for name, proc in self.procs.items():
            with contextlib.suppress(OSError, KeyError):  # exiting processes are caught elsewhere
                rss = memory_mb(proc.pid)["VmRSS"]
                self.max_rss[name] = max(rss, self.max_rss.get(name, 0.0))

    def report(self) -> dict[str, dict[str, float | None]]:
        """``{name: {"hwm", "max_sampled"}}`` in MB, reading ``VmHWM`` now."""
        out: dict[str, dict[str, float | None]] = {}
        for name, proc in self.procs.items():
            try:
                hwm: float | None = memory_mb(proc.pid)["VmHWM"]
            except (OSError, KeyError):
                hwm = None
            out[name] = {"hwm": _round(hwm, 1), "max_sampled": _round(self.max_rss.get(name), 1)}
        return out


class RedisMemorySampler:
    """Largest ``used_memory`` seen in Redis's ``INFO memory``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.peak = 0
        self.samples = 0

    async def used_memory(self) -> int:
        """``used_memory`` now, in bytes."""
        return int((await self.client.info("memory"))["used_memory"])

    async def sample(self) -> None:
        """Take one sample."""
        self.peak = max(self.peak, await self.used_memory())
        self.samples += 1

    async def breakdown(self) -> dict[str, int]:
        """Where ``used_memory`` goes: data, client buffers, cached scripts; and how many keys and clients."""
        info = await self.client.info("memory")
        fields = ("used_memory", "used_memory_dataset", "mem_clients_normal", "used_memory_scripts_eval")
        out = {f: int(info.get(f, 0)) for f in fields}
        out["keys"] = int(await self.client.dbsize())
        out["connected_clients"] = int((await self.client.info("clients"))["connected_clients"])
        return out

    async def key_groups(self, limit: int = 15) -> list[dict[str, Any]]:
        """Keys left in Redis grouped by name with ids masked, largest first (what outlives a batch)."""
        groups: dict[str, list[int]] = {}
        async for key in self.client.scan_iter(count=1000):
            name = re.sub(r"(?<=[_:-])[0-9A-Za-z]{8,}|\d+", "*", key.decode(errors="replace"))
            size = await self.client.memory_usage(key) or 0
            entry = groups.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += size
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:limit]
        return [{"pattern": k, "keys": n, "bytes": b} for k, (n, b) in ranked]


# ============================================================================ the public API


class Api:
    """The few calls a batch client makes, over the public HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, procs: ProcessSet) -> None:
        self.session = session
        self.base_url = base_url
        self.procs = procs
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One JSON call; any non-2xx answer or transport error breaks the run."""
        try:
            async with self.session.request(method, self.base_url + path, headers=self.headers, **kwargs) as resp:
                body = await resp.read()
        except aiohttp.ClientError as exc:
            # A refused connection usually means the web process died: say so rather than just "refused".
            self.procs.check_alive()
            raise BenchError(f"{method} {path} failed: {exc!r}") from exc
        if resp.status >= 300:
            raise BenchError(f"{method} {path} answered {resp.status}: {body[:500]!r}")
        return json.loads(body)

    async def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files, multipart, streamed from disk."""
        with open(path, "rb") as f:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", f, filename=path.name, content_type="application/jsonl")
            return await self.call("POST", "/v1/files", data=form)

    async def create_batch(self, file_id: str) -> dict[str, Any]:
        """POST /v1/batches."""
        body = {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": "24h"}
        return await self.call("POST", "/v1/batches", json=body)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        """GET /v1/batches/{id}."""
        return await self.call("GET", f"/v1/batches/{batch_id}")

    async def delete_file(self, file_id: str) -> None:
        """DELETE /v1/files/{id}."""
        await self.call("DELETE", f"/v1/files/{file_id}")

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a file's content, streamed."""
        url = f"{self.base_url}/v1/files/{file_id}/content"
        async with self.session.get(url, headers=self.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"GET {url} answered {resp.status}: {(await resp.read())[:500]!r}")
            rest = b""
            async for chunk in resp.content.iter_chunked(1 << 20):
                *complete, rest = (rest + chunk).split(b"\n")
                for line in complete:
                    yield line
            if rest:
                yield rest


# ============================================================================ one Sluice run


@dataclass
class Timeline:
    """What the polls saw: when each status was first seen, and request_counts over time.

    Times are seconds since the create request was sent, taken when an answer arrived, so
    Sluice is never credited with a state before the client could know it.
    """

    first_seen: dict[str, float] = dataclasses.field(default_factory=dict)
    progress: list[list[float]] = dataclasses.field(default_factory=list)
    polls: int = 0

    def observe(self, t: float, batch: dict[str, Any]) -> None:
        """Record one batch object seen at ``t``."""
        self.first_seen.setdefault(batch["status"], round(t, 4))
        counts = batch.get("request_counts") or {}
        self.progress.append([round(t, 3), counts.get("completed", 0) + counts.get("failed", 0),
                              counts.get("failed", 0)])
        self.polls += 1

    def reached(self, status: str) -> float | None:
        """First time ``status`` or any later state was seen (a poll can miss a short state)."""
        later = STATE_ORDER[STATE_ORDER.index(status):]
        seen = [self.first_seen[s] for s in later if s in self.first_seen]
        return min(seen) if seen else None

    def state_seconds(self) -> dict[str, float | None]:
        """Seconds spent in each state, from the create request to ``completed``."""
        out: dict[str, float | None] = {}
        for i, state in enumerate(STATE_ORDER[:-1]):
            start = 0.0 if state == "validating" else self.first_seen.get(state)
            end = self.reached(STATE_ORDER[i + 1])
            out[state] = None if start is None or end is None else round(end - start, 4)
        return out


async def poll_until_done(api: Api, batch: dict[str, Any], t_create: float, procs: ProcessSet) -> tuple[
        Timeline, dict[str, Any]]:
    """Poll every ``POLL_S`` until the batch is terminal; returns the timeline and the last object."""
    timeline = Timeline()
    timeline.observe(time.monotonic() - t_create, batch)
    tick = time.monotonic()
    while batch["status"] not in TERMINAL:
        tick += POLL_S
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        procs.check_alive()
        batch = await api.batch(batch["id"])
        timeline.observe(time.monotonic() - t_create, batch)
    if batch["status"] != "completed":
        raise BenchError(f"batch {batch['id']} ended {batch['status']}: errors={batch.get('errors')} "
                         f"counts={batch.get('request_counts')}")
    return timeline, batch


async def verify_output(api: Api, batch: dict[str, Any], lines: int) -> dict[str, int]:
    """Download the output file and check every custom_id is in it exactly once."""
    counts = batch["request_counts"]
    if batch.get("error_file_id") or counts["failed"] or counts["completed"] != lines:
        raise BenchError(f"batch {batch['id']}: request_counts {counts}, error file {batch.get('error_file_id')}")
    if not batch.get("output_file_id"):
        raise BenchError(f"batch {batch['id']} completed without an output file")
    ids = IdCounter()
    async for line in api.lines(batch["output_file_id"]):
        ids.add(line)
    ids.verify(lines, f"output file of {batch['id']}")
    return {"output_lines": sum(ids.ids.values()), "error_lines": 0}


def per_1000(cpu: dict[str, float], lines: int) -> dict[str, dict[str, float]]:
    """CPU seconds and seconds per 1,000 lines, per process and in total."""
    out = {name: {"seconds": round(s, 3), "per_1000_lines": round(s * 1000 / lines, 4)} for name, s in cpu.items()}
    total = sum(cpu.values())
    out["total"] = {"seconds": round(total, 3), "per_1000_lines": round(total * 1000 / lines, 4)}
    return out


async def run_sluice(scenario: Scenario, workers: int, input_path: Path, file_bytes: int, workdir: Path,
                     log_dir: Path) -> dict[str, Any]:
    """One Sluice run on a fresh stack; returns its measurements."""
    with ProcessSet(log_dir) as procs:
        stack = await start_stack(procs, scenario, workers, workdir)
        settled = await wait_settled(stack)
        redis_client = aioredis.Redis(host="127.0.0.1", port=stack.redis_port, socket_timeout=10)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                result = await _measure_batch(stack, Api(session, stack.web_url, procs), redis_client, scenario,
                                              input_path, file_bytes)
        finally:
            await redis_client.aclose()
        procs.check_alive()
    result.update(label=f"Sluice {workers}w", workers=workers, worker_concurrency=scenario.worker_concurrency,
                  settled_before_start=settled)
    return result


async def _measure_batch(stack: Stack, api: Api, redis_client: aioredis.Redis, scenario: Scenario,
                         input_path: Path, file_bytes: int) -> dict[str, Any]:
    redis_mem = RedisMemorySampler(redis_client)
    rss = RssSampler(stack.measured)
    counted = {**stack.measured, "mock-provider": stack.mock}
    idle = await redis_mem.breakdown()
    async with sampling(REDIS_SAMPLE_S, redis_mem.sample), sampling(PROC_SAMPLE_S, rss.sample):
        cpu_before = cpu_snapshot(counted)
        upload_s, timeline, batch = await submit(api, input_path, stack.procs)
        cpu_after = cpu_snapshot(counted)
        output = await verify_output(api, batch, scenario.lines)
        await delete_files(api, batch)
        await asyncio.sleep(AFTER_DELETE_WAIT_S)
        after = await redis_mem.breakdown()
    info_peak = int((await redis_client.info("memory"))["used_memory_peak"])
    cpu = {n: cpu_after[n] - cpu_before[n] for n in stack.measured}
    return {
        "batch_id": batch["id"],
        **throughput(upload_s, timeline, scenario.lines, file_bytes),
        "server_timestamps": {k: batch.get(k) for k in ("created_at", "in_progress_at", "finalizing_at",
                                                           "completed_at")},
        "cpu": per_1000(cpu, scenario.lines),
        "mock_provider_cpu_s": round(cpu_after["mock-provider"] - cpu_before["mock-provider"], 3),
        "rss_mb": rss.report(),
        "redis_memory_mb": _redis_report(idle["used_memory"], redis_mem, info_peak, after["used_memory"]),
        "redis_idle": idle,
        "redis_after_delete": after,
        "redis_keys_after_delete": await redis_mem.key_groups(),
        "output": output,
    }


async def submit(api: Api, input_path: Path, procs: ProcessSet) -> tuple[float, Timeline, dict[str, Any]]:
    """Upload, create the batch and wait for it: upload seconds, the timeline, the final batch."""
    t0 = time.monotonic()
    uploaded = await api.upload(input_path)
    t_create = time.monotonic()
    timeline, batch = await poll_until_done(api, await api.create_batch(uploaded["id"]), t_create, procs)
    return t_create - t0, timeline, batch


async def delete_files(api: Api, batch: dict[str, Any]) -> None:
    """Delete the batch's input, output and error files."""
    for file_id in (batch["input_file_id"], batch.get("output_file_id"), batch.get("error_file_id")):
        if file_id:
            await api.delete_file(file_id)


def throughput(upload_s: float, timeline: Timeline, lines: int, file_bytes: int) -> dict[str, Any]:
    """Ingest and end-to-end figures from the upload time and the polls."""
    to_in_progress = timeline.reached("in_progress")
    ingest_s = None if to_in_progress is None else upload_s + to_in_progress
    e2e = timeline.first_seen["completed"]
    return {
        "lines": lines,
        "file_bytes": file_bytes,
        "upload_s": round(upload_s, 4),
        "create_to_in_progress_s": to_in_progress,
        "ingest_s": _round(ingest_s, 4),
        "ingest_mb_per_s": _round(file_bytes / MIB / ingest_s if ingest_s else None, 2),
        "e2e_s": e2e,
        "lines_per_s": round(lines / e2e, 2),
        "state_seconds": timeline.state_seconds(),
        "status_first_seen_s": timeline.first_seen,
        "polls": timeline.polls,
        "progress": timeline.progress,
    }


def _redis_report(idle: int, sampler: RedisMemorySampler, info_peak: int, after: int) -> dict[str, Any]:
    return {
        "idle": round(idle / MIB, 3),
        "peak_sampled": round(sampler.peak / MIB, 3),
        "used_memory_peak": round(info_peak / MIB, 3),
        "after_delete": round(after / MIB, 3),
        "peak_minus_idle": round((sampler.peak - idle) / MIB, 3),
        "info_peak_minus_idle": round((info_peak - idle) / MIB, 3),
        "after_minus_idle": round((after - idle) / MIB, 3),
        "samples": sampler.samples,
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ============================================================================ the reference


async def run_reference(scenario: Scenario, input_path: Path, workdir: Path, log_dir: Path) -> dict[str, Any]:
    """Run ``bench/reference.py`` on the same file against a fresh mock; returns its measurements."""
    output_path = workdir / "reference-output.jsonl"
    summary_path = workdir / "reference-summary.json"
    with ProcessSet(log_dir) as procs:
        _, mock_url = await start_mock(procs, scenario.latency_ms)
        # The only child reaped while the reference runs is the reference itself (the mock outlives
        # it), so the RUSAGE_CHILDREN delta is exactly its CPU, start-up and exit included.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = [sys.executable, str(REFERENCE), str(input_path), f"{mock_url}/v1",
                str(scenario.reference_concurrency), str(output_path)]
        proc = procs.start("reference", argv, clean_env(), stage=2, stdout_path=summary_path, oneshot=True)
        rss = RssSampler({"reference": proc})
        async with sampling(PROC_SAMPLE_S, rss.sample):
            while proc.alive:
                procs.check_alive()
                await asyncio.sleep(PROC_SAMPLE_S)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.popen.returncode != 0:
            # A dropped connection usually means the mock is going away (its shutdown takes a
            # moment): give it that moment, so the report names the mock rather than the reference.
            await asyncio.sleep(3)
            procs.check_alive()
            raise BenchError(f"the reference exited with {proc.popen.returncode}:\n{proc.tail(8)}")
    verify_file(output_path, scenario.lines, "reference output")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return _reference_result(scenario, json.loads(summary_path.read_text()), cpu, rss.max_rss.get("reference"))


def verify_file(path: Path, lines: int, what: str) -> None:
    """Check a result file on disk holds every custom_id exactly once."""
    ids = IdCounter()
    with open(path, "rb") as f:
        for line in f:
            ids.add(line)
    ids.verify(lines, what)


def _reference_result(scenario: Scenario, summary: dict[str, Any], cpu: float, max_rss: float | None
                      ) -> dict[str, Any]:
    return {
        "label": "reference",
        "concurrency": scenario.reference_concurrency,
        "lines": summary["lines"],
        "seconds": summary["seconds"],
        "lines_per_s": summary["lines_per_s"],
        "progress": summary["progress"],
        "cpu": {"seconds": round(cpu, 3), "per_1000_lines": round(cpu * 1000 / scenario.lines, 4)},
        # VmHWM cannot be read after exit; the sampled maximum is the figure here.
        "rss_mb": {"max_sampled": _round(max_rss, 1)},
    }


# ============================================================================ a scenario


def new_result(scenario: Scenario) -> dict[str, Any]:
    """The result record of ``scenario``, filled in as its runs finish."""
    return {"name": scenario.name, "description": scenario.description, "config": _config(scenario, None),
            "sluice_runs": [], "reference": None}


async def run_scenario(scenario: Scenario, result: dict[str, Any], workdir: Path, log_dir: Path) -> None:
    """Every Sluice run of ``scenario``, then the reference, recorded in ``result`` as each finishes.

    Filling ``result`` in place keeps the runs that did finish when a later one breaks.
    """
    workdir.mkdir(parents=True)
    input_path = workdir / f"{scenario.name}.jsonl"
    file_bytes = write_batch_file(input_path, scenario.lines, scenario.line_bytes)
    result["config"] = _config(scenario, file_bytes)
    for workers in scenario.worker_counts:
        label = f"{workers}w"
        run = await run_sluice(scenario, workers, input_path, file_bytes, workdir / label, log_dir / label)
        result["sluice_runs"].append(run)
    result["reference"] = await run_reference(scenario, input_path, workdir, log_dir / "reference")
    result["ratios"] = ratios(result)
    result["targets"] = scenario.targets(result)


def _config(scenario: Scenario, file_bytes: int | None) -> dict[str, Any]:
    return {
        "lines": scenario.lines,
        "file_bytes": file_bytes,
        "file_mb": None if file_bytes is None else round(file_bytes / MIB, 2),
        "mock_latency_ms": scenario.latency_ms,
        "workers": list(scenario.worker_counts),
        "worker_concurrency": scenario.worker_concurrency,
        "reference_concurrency": scenario.reference_concurrency,
        "line_bytes": scenario.line_bytes,
    }


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Sluice (its largest run) relative to the reference, and 2 workers relative to 1 when both ran."""
    runs, ref = result["sluice_runs"], result["reference"]
    main = runs[-1]
    out: dict[str, float | None] = {
        "lines_per_s": round(main["lines_per_s"] / ref["lines_per_s"], 4),
        "cpu_per_line": _ratio(main["cpu"]["total"]["per_1000_lines"], ref["cpu"]["per_1000_lines"]),
    }
    by_workers = {r["workers"]: r["lines_per_s"] for r in runs}
    if 1 in by_workers and 2 in by_workers:
        out["scaling"] = round(by_workers[2] / by_workers[1], 4)
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


# ============================================================================ report


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


class _Columns:
    """Builds table rows: a cell per Sluice run, then the reference's cell when there is one."""

    def __init__(self, runs: list[dict[str, Any]], ref: dict[str, Any] | None) -> None:
        self.runs = runs
        self.ref = ref

    def row(self, label: str, get: Callable[[dict[str, Any]], Any], ref_value: Any = None,
            digits: int = 2) -> list[str]:
        """``label``, ``get(run)`` for every run, and ``ref_value`` in the reference column."""
        cells = [label] + [_fmt(get(r), digits) for r in self.runs]
        return cells + ([_fmt(ref_value, digits)] if self.ref is not None else [])

    def heading(self, label: str) -> list[str]:
        """A row with a label and empty cells."""
        return [label] + [""] * (len(self.runs) + (self.ref is not None))


def _metric_rows(runs: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[list[str]]:
    cols = _Columns(runs, ref)
    names = sorted({n for r in runs for n in r["cpu"]}, key=_process_order)
    return [*_time_rows(cols, ref), *_cpu_rows(cols, ref, names), *_rss_rows(cols, ref, names), *_redis_rows(cols)]


def _time_rows(cols: _Columns, ref: dict[str, Any] | None) -> list[list[str]]:
    rows = [
        cols.row("lines/s (end to end)", lambda r: r["lines_per_s"], ref and ref["lines_per_s"], 1),
        cols.row("seconds (create -> completed)", lambda r: r["e2e_s"], ref and ref["seconds"]),
        cols.row("upload s", lambda r: r["upload_s"]),
        cols.row("create -> in_progress s", lambda r: r["create_to_in_progress_s"]),
        cols.row("upload + to in_progress s", lambda r: r["ingest_s"]),
        cols.row("ingest MB/s", lambda r: r["ingest_mb_per_s"], None, 1),
    ]
    for state in STATE_ORDER[:-1]:
        rows.append(cols.row(f"time {state} s", lambda r, s=state: r["state_seconds"][s]))
    return rows


def _cpu_rows(cols: _Columns, ref: dict[str, Any] | None, names: list[str]) -> list[list[str]]:
    rows = [cols.heading("CPU s per 1,000 lines")]
    for name in names:
        ref_cpu = ref["cpu"]["per_1000_lines"] if ref is not None and name == "total" else None
        rows.append(cols.row(f"  {name}", lambda r, n=name: r["cpu"].get(n, {}).get("per_1000_lines"), ref_cpu, 3))
    rows.append(cols.row("  (mock provider, not counted)", lambda r: r["mock_provider_cpu_s"] * 1000 / r["lines"],
                         None, 3))
    return rows


def _rss_rows(cols: _Columns, ref: dict[str, Any] | None, names: list[str]) -> list[list[str]]:
    rows = [cols.heading("peak RSS MB (VmHWM / max sampled)")]
    for name in [n for n in names if n != "total"]:
        rows.append(cols.row(f"  {name}", lambda r, n=name: _hwm(r["rss_mb"].get(n))))
    if ref is not None:
        rows.append(cols.row("  reference process", lambda r: None, f"- / {_fmt(ref['rss_mb']['max_sampled'], 1)}"))
    return rows


def _redis_rows(cols: _Columns) -> list[list[str]]:
    rows = [cols.heading("Redis used_memory MB")]
    for key, label in (("idle", "idle"), ("peak_minus_idle", "peak - idle (sampled)"),
                       ("info_peak_minus_idle", "used_memory_peak - idle"),
                       ("after_minus_idle", "after delete - idle")):
        rows.append(cols.row(f"  {label}", lambda r, k=key: r["redis_memory_mb"][k]))
    rows.append(cols.row("  after - idle: dataset / clients", _after_breakdown))
    rows.append(cols.row("  keys after delete (bytes)", _keys_after))
    return rows


def _keys_after(run: dict[str, Any]) -> str:
    size = sum(g["bytes"] for g in run["redis_keys_after_delete"])
    return f"{run['redis_after_delete']['keys']} ({size:,} B)"


def _after_breakdown(run: dict[str, Any]) -> str:
    idle, after = run["redis_idle"], run["redis_after_delete"]
    delta = [(after[k] - idle[k]) / MIB for k in ("used_memory_dataset", "mem_clients_normal")]
    return " / ".join(f"{d:.2f}" for d in delta)


def _process_order(name: str) -> tuple[int, int]:
    # web, workers by number, finalizer, redis-server, then the total
    rank = {"web": 0, "finalizer": 2, "redis-server": 3, "total": 4}
    if name.startswith("worker-"):
        return 1, int(name.removeprefix("worker-"))
    return rank.get(name, 5), 0


def _hwm(rss: dict[str, Any] | None) -> str | None:
    return None if rss is None else f"{_fmt(rss['hwm'], 1)} / {_fmt(rss['max_sampled'], 1)}"


def render_scenario(result: dict[str, Any]) -> str:
    """The scenario's table and targets as text."""
    cfg = result["config"]
    title = (f"=== {result['name']}: {cfg['lines']:,} lines ({_fmt(cfg['file_mb'])} MB), mock latency "
             f"{cfg['mock_latency_ms']:g} ms, {'/'.join(map(str, cfg['workers']))} worker(s) x "
             f"{cfg['worker_concurrency']}, reference x {cfg['reference_concurrency']} ===")
    runs, ref = result["sluice_runs"], result.get("reference")
    parts = [title]
    if runs:
        header = ["", *(r["label"] for r in runs)] + (["reference"] if ref else [])
        parts.append(format_table(header, _metric_rows(runs, ref)))
    if result.get("error"):
        return "\n".join([*parts, f"FAILED: {result['error']}"])
    ratio_text = ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items() if v is not None)
    parts.append(f"ratios Sluice/reference: {ratio_text}")
    parts.append("targets:")
    for t in result["targets"]:
        parts.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {_fmt(t['measured'], 3)} {t['unit']} "
                     f"(target {t['op']} {t['threshold']:g})")
    return "\n".join(parts)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """One subplot per scenario: completed lines over time, Sluice and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.4 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        ax.set_title(f"{result['name']}: {result['config']['lines']:,} lines, "
                     f"latency {result['config']['mock_latency_ms']:g} ms")
        series = [*result.get("sluice_runs", []), *([result["reference"]] if result.get("reference") else [])]
        for run in series:
            t, done = zip(*((p[0], p[1]) for p in run["progress"])) if run["progress"] else ((), ())
            ax.plot(t, done, label=f"{run['label']} ({run['lines_per_s']:,.0f} lines/s)")
        if result.get("error"):
            ax.text(0.5, 0.5, "FAILED", transform=ax.transAxes, ha="center", color="red", fontsize=16)
        ax.set_xlabel("seconds since create (Sluice) / since start (reference)")
        ax.set_ylabel("completed lines")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="lower right")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(h_pad=1.5, rect=(0, 0, 1, 0.985))  # keep a strip for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    """``bench-<stamp>.json`` and ``.png``, copied to ``latest.json`` / ``latest.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = f"Sluice benchmark {stamp}" + (" (smoke)" if report["smoke"] else "")
    plot(report["scenarios"], png_path, title)
    # Copies, not symlinks: they survive the directory being moved or archived.
    shutil.copyfile(json_path, out_dir / "latest.json")
    shutil.copyfile(png_path, out_dir / "latest.png")
    return json_path, png_path


# ============================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark Sluice against a "
                                     "plain asyncio client.")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help=f"one of {', '.join(SCENARIOS)} or all (repeatable or comma list; default all)")
    parser.add_argument("--smoke", action="store_true", help="tiny scenarios that finish in well under a minute")
    parser.add_argument("--lines", type=int, help="override every scenario's line count")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    parser.add_argument("--keep-logs", action="store_true", help="keep process logs under OUT/logs-<timestamp>")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per scenario (600)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for the Sluice processes (repeatable), e.g. "
                             "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 (see bench/otlp_sink.py)")
    args = parser.parse_args(argv)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
        EXTRA_ENV[name] = value
    args.names = [n.strip() for item in (args.scenario or ["all"]) for n in item.split(",") if n.strip()]
    if args.lines is not None and args.lines < 1:
        parser.error("--lines must be >= 1")
    return args


async def run_all(scenarios: list[Scenario], workdir: Path, log_root: Path, timeout: float) -> list[dict[str, Any]]:
    """Run the scenarios one after the other; a broken one is recorded and the next one still runs."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _interrupt, asyncio.current_task())
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


def _interrupt(task: asyncio.Task) -> None:
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
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("redis-server") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "redis_server": redis_version}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 unless a run broke (targets never change the exit status)."""
    args = parse_args(argv)
    scenarios = select_scenarios(args.names, smoke=args.smoke, lines=args.lines)
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
        stop_all_live()
        shutil.rmtree(workdir, ignore_errors=True)
    ok = not any(r.get("error") for r in results)
    report = {"started_at": started, "smoke": args.smoke, "argv": sys.argv[1:], "ok": ok, "mb": "MiB (2**20 bytes)",
              "host": host_info(), "scenarios": results}
    json_path, png_path = write_outputs(report, args.out, stamp)
    print(f"results: {json_path}\nchart:   {png_path}")
    if args.keep_logs:
        print(f"logs:    {log_root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
