"""The ``cluster`` scenario: a batch on a local Redis Cluster (3 masters, a replica each), and the
scale-out ceiling its Redis CPU per line implies.

Per node it reports the Redis CPU per line (``INFO cpu`` ``used_cpu_sys + used_cpu_user``, the delta
over the batch divided by its lines) and, per master, its share of the commands (``INFO
commandstats``, scripts' inner calls included, the harness's own INFO / CONFIG / CLUSTER calls
left out). A batch lives in one shard, so its per-line work lands on one master: that master's CPU
per line is what one Redis core spends per line, and

    lines/s per Redis core        = 1 / (CPU seconds per line on the busiest master)
    cluster ceiling, M masters    = M x lines/s per Redis core   (when batches spread evenly)

The ceiling is Redis's alone: it assumes enough workers, and that nothing else (the provider, the
web process, the network) saturates first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.redis_cluster import RedisClusterServers
from tests.support.stack import StackFactory

from . import runs
from .sampling import RssSampler, cpu_snapshot, sampling, wait_settled
from .scenarios import Scenario

CEILING_FORMULA = (
    "lines/s per Redis core = 1 / (CPU s per line on the busiest master); "
    "cluster ceiling = masters x lines/s per Redis core (batches spread evenly)"
)
# Commands the harness itself sends to the nodes while it measures (a connection's HELLO and CLIENT
# SETINFO, then INFO or CONFIG RESETSTAT), and the replicas' REPLCONF acks: not Sluice's.
HARNESS_COMMANDS = ("info", "hello", "client|", "config|", "cluster|", "replconf")


def _cpu_seconds(cluster: RedisClusterServers) -> dict[str, float]:
    """``used_cpu_sys + used_cpu_user`` of every live node, by node name."""
    out = {}
    for node in cluster.alive():
        info = node.info("cpu")
        out[node.name] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return out


def _roles(cluster: RedisClusterServers) -> dict[str, str]:
    return {cluster.node(port).name: role for port, role in cluster.roles().items()}


def command_shares(stats: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per master: Sluice's command calls (harness commands left out) and their share of all masters'."""
    calls = {
        node: sum(int(v["calls"]) for cmd, v in commands.items() if not cmd.startswith(HARNESS_COMMANDS))
        for node, commands in stats.items()
    }
    total = sum(calls.values())
    return {node: {"calls": n, "share": round(n / total, 4) if total else 0.0} for node, n in calls.items()}


def ceiling(cpu_per_line: dict[str, float], masters: int) -> dict[str, Any]:
    """The scale-out ceiling implied by the masters' CPU seconds per line (see the module docstring)."""
    busiest_node, busiest = max(cpu_per_line.items(), key=lambda kv: kv[1])
    per_core = 1 / busiest if busiest > 0 else None
    return {
        "formula": CEILING_FORMULA,
        "busiest_master": busiest_node,
        "busiest_cpu_us_per_line": round(busiest * 1e6, 2),
        "lines_per_s_per_redis_core": None if per_core is None else round(per_core, 1),
        "masters": masters,
        "cluster_lines_per_s_balanced": None if per_core is None else round(masters * per_core, 1),
    }


async def run_cluster(
    scenario: Scenario, input_path: Path, file_bytes: int, workdir: Path, log_dir: Path
) -> dict[str, Any]:
    """One Sluice run on a fresh cluster-backed stack; returns its measurements."""
    workers = scenario.worker_counts[-1]
    factory = StackFactory(workdir)
    try:
        bench = runs.start_stack(factory, scenario, workers, log_dir)
        cluster = bench.stack.cluster
        assert cluster is not None  # the scenario asked for one
        settled = await wait_settled(bench.measured, bench.procs.check_alive) if scenario.settle else None
        rss = RssSampler(bench.measured)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            api = runs.Api(session, bench.stack.base_url, bench.procs)
            async with sampling(runs.PROC_SAMPLE_S, rss.sample):
                await asyncio.to_thread(cluster.reset_stats)
                redis_before = await asyncio.to_thread(_cpu_seconds, cluster)
                procs_before = cpu_snapshot(bench.measured)
                upload_s, timeline, batch = await runs.submit(api, input_path, bench.procs)
                procs_after = cpu_snapshot(bench.measured)
                redis_after = await asyncio.to_thread(_cpu_seconds, cluster)
                stats = await asyncio.to_thread(cluster.commandstats)
                roles = await asyncio.to_thread(_roles, cluster)
            output = await runs.verify_output(api, batch, scenario.lines)
            await runs.delete_files(api, batch)
        bench.procs.check_alive()
    finally:
        factory.close()
    lines = scenario.lines
    shares = command_shares(stats)
    nodes: dict[str, dict[str, Any]] = {}
    masters: dict[str, float] = {}
    for name in sorted(redis_after, key=lambda n: (roles.get(n) != "master", n)):
        seconds = redis_after[name] - redis_before.get(name, 0.0)
        if roles.get(name) == "master":
            masters[name] = seconds / lines
        nodes[name] = {
            "role": roles.get(name, "?"),
            "cpu_s": round(seconds, 3),
            "cpu_us_per_line": round(seconds / lines * 1e6, 2),
            **shares.get(name, {}),
        }
    sluice_procs = [n for n in bench.measured if not n.startswith("redis-")]
    cpu = {n: procs_after[n] - procs_before[n] for n in sluice_procs}
    return {
        "label": f"Sluice {workers}w, cluster",
        "workers": workers,
        "worker_concurrency": scenario.worker_concurrency,
        "settled_before_start": settled,
        "batch_id": batch["id"],
        **runs.throughput(upload_s, timeline, lines, file_bytes),
        "cpu": runs.per_1000(cpu, lines),
        "rss_mb": {n: v for n, v in rss.report().items() if n in sluice_procs},
        "redis_nodes": nodes,
        "ceiling": ceiling(masters, len(masters)),
        "output": output,
    }


def render(run: dict[str, Any]) -> list[str]:
    """The per-node table and the ceiling, as text lines."""
    from .report import format_table

    rows = [
        [
            name,
            node["role"],
            f"{node['cpu_s']:.3f}",
            f"{node['cpu_us_per_line']:.1f}",
            "-" if "share" not in node else f"{node['share']:.1%}",
            "-" if "calls" not in node else f"{node['calls']:,}",
        ]
        for name, node in run["redis_nodes"].items()
    ]
    header = ["Redis node", "role", "CPU s", "CPU us/line", "share of commands", "calls"]
    c = run["ceiling"]
    return [
        f"{run['label']}: {run['lines']:,} lines in {run['e2e_s']:.2f} s ({run['lines_per_s']:,.1f} lines/s end to end)",
        format_table(header, rows),
        f"ceiling: {c['formula']}",
        f"  busiest master {c['busiest_master']}: {c['busiest_cpu_us_per_line']} us of CPU per line -> "
        f"{c['lines_per_s_per_redis_core']} lines/s per Redis core; {c['masters']} masters balanced -> "
        f"{c['cluster_lines_per_s_balanced']} lines/s",
    ]
