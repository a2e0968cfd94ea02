"""The benchmark's scenarios, their targets, and the batch input file they submit."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

MIB = 1024 * 1024
CHAT_URL = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
STATE_ORDER = ("validating", "in_progress", "finalizing", "completed")


class BenchError(Exception):
    """The run itself broke: the measurement is invalid, not merely slow."""


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
    settle: bool = True  # wait for every process to go idle before timing (see sampling.wait_settled)
    redis: str = "single"  # "cluster": a local 3-master Redis Cluster, measured per node (bench/cluster.py)
    # > 0: the lines split over this many batches, each in a shard of its own, measured per Redis node
    # (bench/cluster.py); 0: one batch against the reference script (bench/runs.py).
    batches: int = 0


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
    checks.append(
        check("Redis used_memory after delete, |after - idle|", None if after is None else abs(after), "<=", 2, "MB")
    )
    return checks


def _scaling_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [check("lines/s 2 workers vs 1 worker", result["ratios"].get("scaling"), ">=", 1.8, "x")]


def _no_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return []


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("latency", "provider latency bound", 20_000, 200, (2,), 64, 128, _latency_targets),
        Scenario("overhead", "no provider latency: Sluice's own cost", 50_000, 0, (2,), 32, 64, _overhead_targets),
        Scenario("bigfile", "~4 KB lines, ~190 MB file", 50_000, 0, (2,), 32, 64, _bigfile_targets, line_bytes=4000),
        Scenario("scaling", "1 worker, then 2 workers", 12_800, 200, (1, 2), 64, 128, _scaling_targets),
        # A measurement without targets: 16 batches, one per shard; Redis CPU per node and the ceiling.
        Scenario(
            "cluster",
            "3-master Redis Cluster, a batch per shard: Redis CPU per node",
            20_000,
            0,
            (2,),
            32,
            64,
            _no_targets,
            redis="cluster",
            batches=16,
        ),
        # The same spread on a single Redis: what many batches cost apart from the cluster.
        Scenario(
            "spread",
            "single Redis, a batch per shard: Redis calls per line",
            20_000,
            0,
            (2,),
            32,
            64,
            _no_targets,
            batches=16,
        ),
    )
}


def smoke_variant(scenario: Scenario) -> Scenario:
    """A tiny version of ``scenario`` that only proves the harness works end to end.

    Its numbers mean nothing, so it skips the settling wait too: what is left is mostly starting
    processes, which is all a busy machine slows down.
    """
    lines = 20 if scenario.name == "bigfile" else 40
    latency = 5 if scenario.latency_ms else 0
    return dataclasses.replace(scenario, lines=lines, latency_ms=latency, settle=False)


def select_scenarios(
    names: Iterable[str], *, smoke: bool, lines: int | None, batches: int | None = None
) -> list[Scenario]:
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
    if batches is not None:
        chosen = [dataclasses.replace(s, batches=batches) if s.batches else s for s in chosen]
    return chosen


# ============================================================================ input file


def request_line(n: int, line_bytes: int | None = None) -> str:
    """Request line ``n`` (custom_id ``req-n``) as JSON, padded to ``line_bytes`` with its newline."""
    message = {"role": "user", "content": f"Say hello to number {n}."}
    line = {"custom_id": f"req-{n}", "method": "POST", "url": CHAT_URL, "body": {"model": MODEL, "messages": [message]}}
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

    def verify(self, lines: int, what: str, first: int = 1) -> None:
        """Raise :class:`BenchError` unless ``req-<first>`` .. ``req-<first + lines - 1>`` each appear
        exactly once."""
        expected = {f"req-{n}" for n in range(first, first + lines)}
        missing = expected - self.ids.keys()
        extra = self.ids.keys() - expected
        dupes = [i for i, c in self.ids.items() if c > 1]
        if missing or extra or dupes:
            raise BenchError(
                f"{what}: {len(missing)} custom_id(s) missing {sorted(missing)[:5]}, {len(dupes)} duplicated "
                f"{sorted(dupes)[:5]}, {len(extra)} unexpected {sorted(extra)[:5]} (expected {lines} lines)"
            )
