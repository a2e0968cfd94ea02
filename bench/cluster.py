"""The ``cluster`` scenario: batches spread over every shard of a local Redis Cluster (3 masters, a
replica each), the balance over the masters, and the ceiling the masters' Redis CPU implies.

A batch lives in one shard (``service.core.keys.shard_of``: its input file's id's last hex digit),
so one batch loads one master. The scenario therefore splits its lines over one batch per shard
(16 x 1,250 = 20,000): it uploads the parts until every shard holds one input file (a web process
gives its files the shards in turn; a file landing in a shard already taken is deleted unused),
creates every batch at once and waits for all of them.

Per node it reports the Redis CPU seconds (``INFO cpu`` ``used_cpu_sys + used_cpu_user``, the delta
over the whole run), that divided by all the run's lines, and, per master, its share of the
commands (``INFO commandstats``, scripts' inner calls included, the harness's own INFO / CONFIG /
CLUSTER calls left out). From the masters' CPU seconds (replicas' left out):

    lines/s per Redis core = total lines / sum of the masters' CPU seconds
    cluster ceiling        = total lines / CPU seconds of the busiest master

The first is what one fully busy Redis core sustains; the second is the rate at which the busiest
master would saturate its one core with the work spread as in this run (16 shards over the masters'
slot ranges: 6/5/5 over 3), so it already carries the imbalance. Both are Redis's alone: they assume
enough workers, and that nothing else (the provider, the web process, the network) saturates first.
The end-to-end rate is the run's total lines over the time from the first upload to the last batch
seen completed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from service.core import keys
from tests.support.processes import ProcessRunner
from tests.support.redis_cluster import RedisClusterServers
from tests.support.redis_server import RedisServer
from tests.support.stack import StackFactory

from . import runs
from .sampling import RssSampler, cpu_snapshot, sampling, wait_settled
from .scenarios import TERMINAL, BenchError, Scenario

CEILING_FORMULA = (
    "lines/s per Redis core = total lines / sum of masters' CPU s; "
    "cluster ceiling = total lines / busiest master's CPU s"
)
# Commands the harness itself sends to the nodes while it measures (a connection's HELLO and CLIENT
# SETINFO, then INFO or CONFIG RESETSTAT), and the replicas' REPLCONF acks: not Sluice's.
HARNESS_COMMANDS = ("info", "hello", "client|", "config|", "cluster|", "replconf")
# Each unfinished batch is polled this often: 16 batches polled every 0.1 s would add Redis reads
# enough to show in the per-line figures, and half a second is small next to a run's length.
SPREAD_POLL_S = 0.5
# A web process gives its files the shards in turn, so a part rarely needs a second upload; this
# only bounds a stack that keeps answering with taken shards.
MAX_UPLOADS_PER_PART = 4 * keys.SHARDS
# Commands listed by name in the per-line breakdown; the rest are summed as ``other``.
TOP_COMMANDS = 10


@dataclass(frozen=True)
class Part:
    """One batch's share of the scenario's lines: ``req-<first>`` .. and its input file on disk."""

    first: int
    lines: int
    path: Path


def split_lines(lines: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each part: ``lines`` split as evenly as can be over ``min(parts, lines)``."""
    n = min(parts, lines)
    base, extra = divmod(lines, n)
    out, first = [], 1
    for i in range(n):
        count = base + (i < extra)
        out.append((first, count))
        first += count
    return out


def write_parts(input_path: Path, workdir: Path, parts: int) -> list[Part]:
    """Cut the scenario's input file (line ``n`` is ``req-n``) into ``parts`` files, in order."""
    with open(input_path, "rb") as f:
        lines = f.readlines()
    out = []
    for i, (first, count) in enumerate(split_lines(len(lines), parts)):
        path = workdir / f"part-{i:02d}.jsonl"
        path.write_bytes(b"".join(lines[first - 1 : first - 1 + count]))
        out.append(Part(first, count, path))
    return out


async def upload_one_per_shard(api: runs.Api, parts: list[Part]) -> tuple[list[tuple[Part, str]], int]:
    """Upload every part into a shard of its own; returns ``(part, file id)`` and the extra uploads.

    A file that lands in a shard already taken is deleted before anything else runs.
    """
    taken: set[int] = set()
    placed: list[tuple[Part, str]] = []
    extra: list[str] = []
    for part in parts:
        for _ in range(MAX_UPLOADS_PER_PART):
            file_id = (await api.upload(part.path))["id"]
            shard = keys.shard_of(file_id)
            if shard not in taken:
                taken.add(shard)
                placed.append((part, file_id))
                break
            extra.append(file_id)
        else:
            raise BenchError(f"{MAX_UPLOADS_PER_PART} uploads found no free shard; taken: {sorted(taken)}")
    for file_id in extra:
        await api.delete_file(file_id)
    return placed, len(extra)


@dataclass
class SpreadTimeline:
    """Seconds since the first upload at which the client first saw each batch in each state, and the
    lines done over all batches at every round of polls."""

    created_s: float = 0.0
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)  # batch id -> status -> s
    progress: list[list[float]] = field(default_factory=list)  # [s, lines done, lines failed]
    polls: int = 0

    def observe(self, t: float, batch: dict[str, Any]) -> None:
        """Record one batch object seen at ``t``."""
        self.first_seen.setdefault(batch["id"], {}).setdefault(batch["status"], round(t, 4))
        self.polls += 1

    def last(self, status: str) -> float | None:
        """When the last batch was first seen in ``status`` (None if one never was)."""
        times = [seen.get(status) for seen in self.first_seen.values()]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)


async def run_batches(
    api: runs.Api, files: list[str], t0: float, procs: ProcessRunner
) -> tuple[SpreadTimeline, list[dict[str, Any]]]:
    """Create a batch on every file at once and poll them until all are terminal."""
    timeline = SpreadTimeline()
    created = await asyncio.gather(*(api.create_batch(file_id) for file_id in files))
    timeline.created_s = round(time.monotonic() - t0, 4)
    batches = {b["id"]: b for b in created}
    for batch in created:
        timeline.observe(timeline.created_s, batch)
    tick = time.monotonic()
    while pending := [i for i, b in batches.items() if b["status"] not in TERMINAL]:
        tick += SPREAD_POLL_S
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        procs.check_alive()
        for batch in await asyncio.gather(*(api.batch(i) for i in pending)):
            timeline.observe(time.monotonic() - t0, batch)
            batches[batch["id"]] = batch
        done = [_counts(b) for b in batches.values()]
        timeline.progress.append(
            [
                round(time.monotonic() - t0, 3),
                sum(d for d, _ in done),
                sum(f for _, f in done),
            ]
        )
    broken = [b for b in batches.values() if b["status"] != "completed"]
    if broken:
        raise BenchError(
            f"{len(broken)} batch(es) did not complete: "
            + "; ".join(f"{b['id']} {b['status']} errors={b.get('errors')}" for b in broken[:3])
        )
    return timeline, [batches[b["id"]] for b in created]


def _counts(batch: dict[str, Any]) -> tuple[int, int]:
    counts = batch.get("request_counts") or {}
    return counts.get("completed", 0) + counts.get("failed", 0), counts.get("failed", 0)


@dataclass
class SingleServer:
    """A single ``redis-server`` seen as a cluster of one master, so the spread runs measure it alike."""

    server: RedisServer

    @dataclass(frozen=True)
    class Node:
        server: RedisServer

        @property
        def name(self) -> str:
            return f"127.0.0.1:{self.server.port}"

        def info(self, section: str) -> dict[str, Any]:
            client = self.server.client()
            try:
                return dict(client.info(section))
            finally:
                client.close()

    def alive(self) -> list[Node]:
        return [self.Node(self.server)]

    def masters(self) -> list[Node]:
        return self.alive()

    def node(self, port: int) -> Node:
        return self.Node(self.server)

    def roles(self) -> dict[int, str]:
        return {self.server.port: "master"}

    def master_of_key(self, key: str) -> Node:
        return self.Node(self.server)

    def commandstats(self) -> dict[str, dict[str, dict[str, float]]]:
        """``INFO commandstats`` as :meth:`RedisClusterServers.commandstats` gives it."""
        node = self.Node(self.server)
        return {node.name: {n.removeprefix("cmdstat_"): v for n, v in node.info("commandstats").items()}}

    def reset_stats(self) -> None:
        client = self.server.client()
        try:
            client.config_resetstat()
        finally:
            client.close()


Servers = RedisClusterServers | SingleServer


def _cpu_seconds(cluster: Servers) -> dict[str, float]:
    """``used_cpu_sys + used_cpu_user`` of every live node, by node name."""
    out = {}
    for node in cluster.alive():
        info = node.info("cpu")
        out[node.name] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return out


def _roles(cluster: Servers) -> dict[str, str]:
    return {cluster.node(port).name: role for port, role in cluster.roles().items()}


def _shards_by_master(cluster: Servers) -> dict[str, list[int]]:
    """The shards each master serves (by the slot of a shard's key)."""
    out: dict[str, list[int]] = {}
    for shard in range(keys.SHARDS):
        out.setdefault(cluster.master_of_key(keys.active_batches(shard)).name, []).append(shard)
    return out


def command_shares(
    stats: dict[str, dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """Per master: Sluice's command calls (harness commands left out) and their share of all masters'."""
    calls = {
        node: sum(int(v["calls"]) for cmd, v in commands.items() if not cmd.startswith(HARNESS_COMMANDS))
        for node, commands in stats.items()
    }
    total = sum(calls.values())
    return {node: {"calls": n, "share": round(n / total, 4) if total else 0.0} for node, n in calls.items()}


def commands_per_line(
    stats: dict[str, dict[str, dict[str, float]]], lines: int, top: int | None = TOP_COMMANDS
) -> dict[str, float]:
    """Sluice's calls per line by command, summed over the masters (harness commands left out): the
    ``top`` commands with the most (every one with None), then ``other`` and ``total``."""
    calls: dict[str, int] = {}
    for commands in stats.values():
        for cmd, v in commands.items():
            if not cmd.startswith(HARNESS_COMMANDS):
                calls[cmd] = calls.get(cmd, 0) + int(v["calls"])
    ranked = sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))
    out = {cmd: round(n / lines, 3) for cmd, n in ranked[:top]}
    out["other"] = round(sum(n for _, n in ranked[len(out) :]) / lines, 3)
    out["total"] = round(sum(calls.values()) / lines, 3)
    return out


def ceiling(masters_cpu_s: dict[str, float], lines: int) -> dict[str, Any]:
    """The ceiling implied by the masters' CPU seconds over a run of ``lines`` (module docstring)."""
    busiest_node, busiest = max(masters_cpu_s.items(), key=lambda kv: kv[1])
    total = sum(masters_cpu_s.values())
    return {
        "formula": CEILING_FORMULA,
        "lines": lines,
        "masters": len(masters_cpu_s),
        "masters_cpu_s": round(total, 3),
        "busiest_master": busiest_node,
        "busiest_cpu_s": round(busiest, 3),
        "busiest_share_of_masters_cpu": round(busiest / total, 4) if total > 0 else None,
        "lines_per_s_per_redis_core": round(lines / total, 1) if total > 0 else None,
        "cluster_ceiling_lines_per_s": round(lines / busiest, 1) if busiest > 0 else None,
    }


async def run_cluster(
    scenario: Scenario, input_path: Path, file_bytes: int, workdir: Path, log_dir: Path
) -> dict[str, Any]:
    """One Sluice run on a fresh cluster-backed stack, a batch per shard; returns its measurements."""
    workers = scenario.worker_counts[-1]
    parts = write_parts(input_path, workdir, scenario.batches)
    factory = StackFactory(workdir)
    try:
        bench = runs.start_stack(factory, scenario, workers, log_dir)
        cluster: Servers = bench.stack.cluster if bench.stack.cluster is not None else SingleServer(bench.stack.redis)
        settled = await wait_settled(bench.measured, bench.procs.check_alive) if scenario.settle else None
        shards_by_master = await asyncio.to_thread(_shards_by_master, cluster)
        rss = RssSampler(bench.measured)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            api = runs.Api(session, bench.stack.base_url, bench.procs)
            async with sampling(runs.PROC_SAMPLE_S, rss.sample):
                await asyncio.to_thread(cluster.reset_stats)
                redis_before = await asyncio.to_thread(_cpu_seconds, cluster)
                procs_before = cpu_snapshot(bench.measured)
                t0 = time.monotonic()
                placed, extra_uploads = await upload_one_per_shard(api, parts)
                upload_s = time.monotonic() - t0
                timeline, batches = await run_batches(api, [f for _, f in placed], t0, bench.procs)
                procs_after = cpu_snapshot(bench.measured)
                redis_after = await asyncio.to_thread(_cpu_seconds, cluster)
                stats = await asyncio.to_thread(cluster.commandstats)
                roles = await asyncio.to_thread(_roles, cluster)
            outputs = [
                await runs.verify_output(api, batch, part.lines, part.first)
                for (part, _), batch in zip(placed, batches)
            ]
            for batch in batches:
                await runs.delete_files(api, batch)
        bench.procs.check_alive()
    finally:
        factory.close()
    lines = scenario.lines
    shares = command_shares(stats)
    nodes: dict[str, dict[str, Any]] = {}
    masters_cpu_s: dict[str, float] = {}
    for name in sorted(redis_after, key=lambda n: (roles.get(n) != "master", n)):
        seconds = redis_after[name] - redis_before.get(name, 0.0)
        if roles.get(name) == "master":
            masters_cpu_s[name] = seconds
        nodes[name] = {
            "role": roles.get(name, "?"),
            "cpu_s": round(seconds, 3),
            "cpu_us_per_line": round(seconds / lines * 1e6, 2),
            **shares.get(name, {}),
        }
        if name in shards_by_master:
            nodes[name]["shards"] = len(shards_by_master[name])
    sluice_procs = [n for n in bench.measured if not n.startswith("redis-")]
    cpu = {n: procs_after[n] - procs_before[n] for n in sluice_procs}
    e2e_s = timeline.last("completed")
    assert e2e_s is not None  # run_batches returns once every batch completed
    return {
        "label": f"Sluice {workers}w, {scenario.redis}",
        "redis": scenario.redis,
        "workers": workers,
        "worker_concurrency": scenario.worker_concurrency,
        "settled_before_start": settled,
        "lines": lines,
        "file_bytes": file_bytes,
        "batches": [
            {
                "id": batch["id"],
                "shard": keys.shard_of(batch["id"]),
                "first_line": part.first,
                "lines": part.lines,
                "completed_s": timeline.first_seen[batch["id"]]["completed"],
            }
            for (part, _), batch in zip(placed, batches)
        ],
        "extra_uploads": extra_uploads,
        "shards_by_master": shards_by_master,
        "upload_s": round(upload_s, 4),
        "created_s": timeline.created_s,
        "all_in_progress_s": timeline.last("in_progress"),
        "e2e_s": e2e_s,
        "e2e_from": "first upload",
        "lines_per_s": round(lines / e2e_s, 2),
        "polls": timeline.polls,
        "poll_interval_s": SPREAD_POLL_S,
        "progress": timeline.progress,
        "cpu": runs.per_1000(cpu, lines),
        "rss_mb": {n: v for n, v in rss.report().items() if n in sluice_procs},
        "redis_nodes": nodes,
        "redis_calls_per_line": commands_per_line(stats, lines),
        "redis_calls_per_line_all": commands_per_line(stats, lines, top=None),
        "ceiling": ceiling(masters_cpu_s, lines),
        "output": {
            "output_lines": sum(o["output_lines"] for o in outputs),
            "error_lines": sum(o["error_lines"] for o in outputs),
        },
    }


def render(run: dict[str, Any]) -> list[str]:
    """The per-node table and the ceiling, as text lines."""
    from .report import format_table

    rows = [
        [
            name,
            node["role"],
            "-" if "shards" not in node else str(node["shards"]),
            f"{node['cpu_s']:.3f}",
            f"{node['cpu_us_per_line']:.1f}",
            "-" if "share" not in node else f"{node['share']:.1%}",
            "-" if "calls" not in node else f"{node['calls']:,}",
        ]
        for name, node in run["redis_nodes"].items()
    ]
    header = [
        "Redis node",
        "role",
        "shards",
        "CPU s",
        "CPU us/line (all lines)",
        "share of commands",
        "calls",
    ]
    c = run["ceiling"]
    busiest_share = c["busiest_share_of_masters_cpu"]
    per_line = run.get("redis_calls_per_line", {})
    breakdown = ", ".join(f"{cmd} {n:.2f}" for cmd, n in per_line.items() if cmd != "total")
    return [
        f"{run['label']}: {run['lines']:,} lines in {len(run['batches'])} batches (one per shard), "
        f"{run['e2e_s']:.2f} s from the first upload to the last batch completed "
        f"({run['lines_per_s']:,.1f} lines/s end to end; uploads {run['upload_s']:.2f} s, "
        f"{run['extra_uploads']} extra)",
        format_table(header, rows),
        f"ceiling: {c['formula']}",
        f"  {c['masters']} masters: {c['masters_cpu_s']:.3f} CPU s -> {c['lines_per_s_per_redis_core']} lines/s "
        f"per Redis core",
        f"  busiest master {c['busiest_master']}: {c['busiest_cpu_s']:.3f} CPU s"
        + ("" if busiest_share is None else f" ({busiest_share:.1%} of the masters')")
        + f" -> cluster ceiling {c['cluster_ceiling_lines_per_s']} lines/s",
        *(
            [f"Redis calls/line {per_line['total']:.2f} (masters, script calls included): {breakdown}"]
            if per_line
            else []
        ),
    ]
