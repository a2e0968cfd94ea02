"""One benchmark scenario: Sluice runs on fresh stacks (driven through the public HTTP API exactly as
a client would), then the plain asyncio reference on the same lines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import redis.asyncio as aioredis

from tests.support.env import base_env
from tests.support.mocks import MockSpec, start_mock
from tests.support.processes import ProcessRunner
from tests.support.stack import Stack, StackFactory

from .sampling import (
    MIB,
    RedisMemorySampler,
    RssSampler,
    cpu_snapshot,
    sampling,
    wait_settled,
)
from .scenarios import (
    CHAT_URL,
    STATE_ORDER,
    TERMINAL,
    BenchError,
    IdCounter,
    Scenario,
    write_batch_file,
)

REFERENCE = Path(__file__).resolve().parent / "reference.py"
TOKEN = "sk-bench-token"
POLL_S = 0.1
PROC_SAMPLE_S = 0.1
REDIS_SAMPLE_S = 0.05
# Between SIGTERM and SIGKILL; above SLUICE_SHUTDOWN_GRACE_S, so a graceful stop always finishes.
STOP_GRACE_S = 10.0
SHUTDOWN_GRACE_S = 5
AFTER_DELETE_WAIT_S = 1.0
# More environment for every Sluice process (``python -m bench.run --env NAME=VALUE``), e.g. to turn
# tracing on.
EXTRA_ENV: dict[str, str] = {}


# ============================================================================ the Sluice stack


@dataclass
class BenchStack:
    """A running Sluice stack and the processes whose CPU and memory are measured."""

    stack: Stack
    measured: dict[str, Any]  # web, worker-N, finalizer, redis-server: ManagedProcess objects
    mock: Any

    @property
    def procs(self) -> ProcessRunner:
        return self.stack.runner


def start_stack(factory: StackFactory, scenario: Scenario, workers: int, log_dir: Path) -> BenchStack:
    """Redis, mock, web, ``workers`` workers and the finalizer (tests/support's stack), once web is ready."""
    stack = factory.start(
        name=f"{workers}w",
        workers=workers,
        worker_concurrency=scenario.worker_concurrency,
        tokens=(TOKEN,),
        mock=MockSpec(latency_ms=scenario.latency_ms),
        upstream_suffix="/v1",
        redis=scenario.redis,
        stop_grace=STOP_GRACE_S,
        log_dir=log_dir,
        env={"SLUICE_LOG_LEVEL": "warning", "SLUICE_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S), **EXTRA_ENV},
    )
    stack.wait_ready()
    measured = {"web": stack.process("web")}
    measured.update({f"worker-{i}": stack.process(f"worker-{i}") for i in range(1, workers + 1)})
    measured["finalizer"] = stack.process("finalizer")
    if stack.cluster is not None:
        measured.update({f"redis-{node.port}": node.process for node in stack.cluster.nodes})
    else:
        measured["redis-server"] = stack.redis.process
    return BenchStack(stack, measured, stack.mock().process)


# ============================================================================ the public API


class Api:
    """The few calls a batch client makes, over the public HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, procs: ProcessRunner) -> None:
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
        with open(path, "rb") as f:  # noqa: ASYNC230 - aiohttp reads the file object in its executor
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
        self.progress.append(
            [round(t, 3), counts.get("completed", 0) + counts.get("failed", 0), counts.get("failed", 0)]
        )
        self.polls += 1

    def reached(self, status: str) -> float | None:
        """First time ``status`` or any later state was seen (a poll can miss a short state)."""
        later = STATE_ORDER[STATE_ORDER.index(status) :]
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


async def poll_until_done(
    api: Api, batch: dict[str, Any], t_create: float, procs: ProcessRunner
) -> tuple[Timeline, dict[str, Any]]:
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
        raise BenchError(
            f"batch {batch['id']} ended {batch['status']}: errors={batch.get('errors')} "
            f"counts={batch.get('request_counts')}"
        )
    return timeline, batch


async def verify_output(api: Api, batch: dict[str, Any], lines: int, first: int = 1) -> dict[str, int]:
    """Download the output file and check every custom_id (``req-<first>`` on) is in it exactly once."""
    counts = batch["request_counts"]
    if batch.get("error_file_id") or counts["failed"] or counts["completed"] != lines:
        raise BenchError(f"batch {batch['id']}: request_counts {counts}, error file {batch.get('error_file_id')}")
    if not batch.get("output_file_id"):
        raise BenchError(f"batch {batch['id']} completed without an output file")
    ids = IdCounter()
    async for line in api.lines(batch["output_file_id"]):
        ids.add(line)
    ids.verify(lines, f"output file of {batch['id']}", first)
    return {"output_lines": sum(ids.ids.values()), "error_lines": 0}


def per_1000(cpu: dict[str, float], lines: int) -> dict[str, dict[str, float]]:
    """CPU seconds and seconds per 1,000 lines, per process and in total."""
    out = {name: {"seconds": round(s, 3), "per_1000_lines": round(s * 1000 / lines, 4)} for name, s in cpu.items()}
    total = sum(cpu.values())
    out["total"] = {"seconds": round(total, 3), "per_1000_lines": round(total * 1000 / lines, 4)}
    return out


async def run_sluice(
    scenario: Scenario, workers: int, input_path: Path, file_bytes: int, workdir: Path, log_dir: Path
) -> dict[str, Any]:
    """One Sluice run on a fresh stack; returns its measurements."""
    factory = StackFactory(workdir)
    try:
        bench = start_stack(factory, scenario, workers, log_dir)
        settled = await wait_settled(bench.measured, bench.procs.check_alive) if scenario.settle else None
        redis_client = aioredis.Redis(host="127.0.0.1", port=bench.stack.redis.port, socket_timeout=10)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                result = await _measure_batch(
                    bench,
                    Api(session, bench.stack.base_url, bench.procs),
                    redis_client,
                    scenario,
                    input_path,
                    file_bytes,
                )
        finally:
            await redis_client.aclose()
        bench.procs.check_alive()
    finally:
        factory.close()
    result.update(
        label=f"Sluice {workers}w",
        workers=workers,
        worker_concurrency=scenario.worker_concurrency,
        settled_before_start=settled,
    )
    return result


async def _measure_batch(
    stack: BenchStack, api: Api, redis_client: aioredis.Redis, scenario: Scenario, input_path: Path, file_bytes: int
) -> dict[str, Any]:
    redis_mem = RedisMemorySampler(redis_client)
    rss = RssSampler(stack.measured)
    counted = {**stack.measured, "mock-provider": stack.mock}
    idle = await redis_mem.breakdown()
    async with sampling(REDIS_SAMPLE_S, redis_mem.sample), sampling(PROC_SAMPLE_S, rss.sample):
        calls_before = await redis_calls(redis_client)
        cpu_before = cpu_snapshot(counted)
        upload_s, timeline, batch = await submit(api, input_path, stack.procs)
        cpu_after = cpu_snapshot(counted)
        calls_after = await redis_calls(redis_client)
        output = await verify_output(api, batch, scenario.lines)
        await delete_files(api, batch)
        await asyncio.sleep(AFTER_DELETE_WAIT_S)
        after = await redis_mem.breakdown()
    info_peak = int((await redis_client.info("memory"))["used_memory_peak"])
    cpu = {n: cpu_after[n] - cpu_before[n] for n in stack.measured}
    return {
        "batch_id": batch["id"],
        **throughput(upload_s, timeline, scenario.lines, file_bytes),
        "server_timestamps": {
            k: batch.get(k) for k in ("created_at", "in_progress_at", "finalizing_at", "completed_at")
        },
        "cpu": per_1000(cpu, scenario.lines),
        "mock_provider_cpu_s": round(cpu_after["mock-provider"] - cpu_before["mock-provider"], 3),
        "redis_calls_per_line": calls_per_line(calls_before, calls_after, scenario.lines),
        "rss_mb": rss.report(),
        "redis_memory_mb": _redis_report(idle["used_memory"], redis_mem, info_peak, after["used_memory"]),
        "redis_idle": idle,
        "redis_after_delete": after,
        "redis_keys_after_delete": await redis_mem.key_groups(),
        "output": output,
    }


async def redis_calls(r: aioredis.Redis) -> dict[str, int]:
    """Redis's count of calls per command so far (INFO commandstats; a script's inner calls count too)."""
    stats = await r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items() if isinstance(v, dict)}


def calls_per_line(before: dict[str, int], after: dict[str, int], lines: int) -> dict[str, float]:
    """Calls per line of every command that ran meanwhile, and their total, biggest first."""
    delta = {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}
    out = {n: round(c / lines, 3) for n, c in sorted(delta.items(), key=lambda kv: -kv[1])}
    return {"total": round(sum(delta.values()) / lines, 3), **out}


async def submit(api: Api, input_path: Path, procs: ProcessRunner) -> tuple[float, Timeline, dict[str, Any]]:
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
    with ProcessRunner(log_dir, grace=STOP_GRACE_S) as procs:
        mock = start_mock(procs, "default", MockSpec(latency_ms=scenario.latency_ms), env=base_env())
        mock.wait_ready(procs)
        # The only child reaped while the reference runs is the reference itself (the mock outlives
        # it), so the RUSAGE_CHILDREN delta is exactly its CPU, start-up and exit included.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = [
            sys.executable,
            str(REFERENCE),
            str(input_path),
            f"{mock.url}/v1",
            str(scenario.reference_concurrency),
            str(output_path),
        ]
        proc = procs.start("reference", argv, env=base_env(), stop_stage=2, stdout_path=summary_path, oneshot=True)
        rss = RssSampler({"reference": proc})
        async with sampling(PROC_SAMPLE_S, rss.sample):
            while proc.alive:
                procs.check_alive()
                await asyncio.sleep(PROC_SAMPLE_S)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            # A dropped connection usually means the mock is going away (its shutdown takes a
            # moment): give it that moment, so the report names the mock rather than the reference.
            await asyncio.sleep(3)
            procs.check_alive()
            raise BenchError(f"the reference exited with {proc.returncode}:\n{proc.tail(8)}")
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


def _reference_result(scenario: Scenario, summary: dict[str, Any], cpu: float, max_rss: float | None) -> dict[str, Any]:
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
    return {
        "name": scenario.name,
        "description": scenario.description,
        "config": _config(scenario, None),
        "sluice_runs": [],
        "reference": None,
    }


async def run_scenario(scenario: Scenario, result: dict[str, Any], workdir: Path, log_dir: Path) -> None:
    """Every Sluice run of ``scenario``, then the reference, recorded in ``result`` as each finishes.

    Filling ``result`` in place keeps the runs that did finish when a later one breaks.
    """
    workdir.mkdir(parents=True)  # noqa: ASYNC240 - set-up: nothing else runs on the loop yet
    input_path = workdir / f"{scenario.name}.jsonl"
    file_bytes = write_batch_file(input_path, scenario.lines, scenario.line_bytes)
    result["config"] = _config(scenario, file_bytes)
    if scenario.batches:
        from .cluster import run_cluster

        # Redis per node is the measurement; the reference (no Redis at all) adds nothing here.
        result["sluice_runs"].append(await run_cluster(scenario, input_path, file_bytes, workdir, log_dir))
        result["ratios"] = {}
        result["targets"] = scenario.targets(result)
        return
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
        "redis": scenario.redis,
        "batches": scenario.batches,
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
