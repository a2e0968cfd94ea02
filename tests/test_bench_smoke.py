"""The benchmark harness runs end to end: ``python -m bench.run --smoke`` as a managed process.

Only the shape of the results is checked, never the timings: the smoke scenarios are too small
for their numbers to mean anything, and CI machines vary. The run's time bound is a hang detector
only: a smoke run takes seconds on an idle machine, and minutes at worst on a loaded one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.processes import ProcessRunner, fail_if_died
from tests.support.waiting import wait_until

SCENARIOS = {"latency", "overhead", "bigfile", "scaling", "cluster", "spread"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_BOUND_S = 900

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RUN_BOUND_S + 60)]


class SmokeRun:
    """The finished run: exit code, stdout, stderr and output directory."""

    def __init__(self, returncode: int, stdout: str, stderr: str, out: Path):
        self.returncode, self.stdout, self.stderr, self.out = returncode, stdout, stderr, out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One smoke run shared by the module's tests."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    root = tmp_path_factory.mktemp("bench")
    out, stdout = root / "out", root / "stdout.txt"
    # A managed process: in its own group, stopped (SIGTERM: the bench then stops its stacks) whatever
    # happens here; the bench's own children die with it if it is killed.
    with ProcessRunner(root / "logs", grace=30) as runner:
        bench = runner.start(
            "bench", [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)], stdout_path=stdout, oneshot=True
        )
        wait_until(
            lambda: not bench.alive,
            timeout=RUN_BOUND_S,
            interval=0.5,
            message=lambda: f"the smoke run to end; its log so far:\n{bench.tail()}",
        )
        result = SmokeRun(bench.returncode, stdout.read_text(), bench.tail(400), out)
    fail_if_died(runner.died(), runner)
    return result


def _report(out: Path) -> dict:
    runs = list(out.glob("bench-*.json"))
    assert len(runs) == 1, f"expected one bench-*.json in {out}, found {runs}"
    assert (out / "latest.json").read_bytes() == runs[0].read_bytes()
    return json.loads(runs[0].read_text())


def test_smoke_run_succeeds(smoke_run):
    run = smoke_run
    assert run.returncode == 0, f"bench exited with {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    for name in SCENARIOS:
        assert f"=== {name}:" in run.stdout, f"no table for {name}:\n{run.stdout}"


def test_json_has_every_scenario_with_throughput_and_cpu(smoke_run):
    assert smoke_run.returncode == 0, smoke_run.stderr
    report = _report(smoke_run.out)
    assert report["ok"] is True and report["smoke"] is True
    by_name = {s["name"]: s for s in report["scenarios"]}
    assert set(by_name) == SCENARIOS
    for name, scenario in by_name.items():
        assert "error" not in scenario, f"{name}: {scenario.get('error')}"
        if name == "cluster":
            _check_cluster(scenario)
            continue
        if name == "spread":
            _check_spread(scenario)
            continue
        assert scenario["reference"]["lines_per_s"] > 0, name
        assert scenario["reference"]["cpu"]["seconds"] >= 0, name
        assert scenario["targets"] and all(isinstance(t["pass"], bool) for t in scenario["targets"]), name
        for run in scenario["sluice_runs"]:
            assert run["lines_per_s"] > 0, f"{name} {run['label']}"
            assert run["output"]["output_lines"] == scenario["config"]["lines"]
            expected = {"web", "finalizer", "redis-server", "total"} | {
                f"worker-{i}" for i in range(1, run["workers"] + 1)
            }
            assert set(run["cpu"]) == expected, f"{name} {run['label']}: {sorted(run['cpu'])}"
            for proc_name, cpu in run["cpu"].items():
                assert cpu["seconds"] >= 0 and cpu["per_1000_lines"] >= 0, f"{name} {proc_name}: {cpu}"
            for proc_name, rss in run["rss_mb"].items():
                assert rss["hwm"] and rss["hwm"] > 0, f"{name} {proc_name}: {rss}"
    assert [r["workers"] for r in by_name["scaling"]["sluice_runs"]] == [1, 2]


def _check_cluster(scenario: dict) -> None:
    """The cluster scenario: no reference, a batch per shard, Redis CPU per node, shares and the ceiling."""
    assert scenario["reference"] is None and scenario["targets"] == []
    (run,) = scenario["sluice_runs"]
    lines = scenario["config"]["lines"]
    assert run["lines_per_s"] > 0 and run["output"]["output_lines"] == lines
    batches = run["batches"]
    assert sorted(b["shard"] for b in batches) == list(range(16)), batches
    assert sum(b["lines"] for b in batches) == lines, batches
    assert all(b["completed_s"] <= run["e2e_s"] for b in batches), batches
    nodes = run["redis_nodes"]
    assert len(nodes) == 6, nodes
    masters = {n: v for n, v in nodes.items() if v["role"] == "master"}
    assert len(masters) == 3, nodes
    assert sum(v["shards"] for v in masters.values()) == 16, masters
    assert abs(sum(v["share"] for v in masters.values()) - 1) < 0.01, masters
    assert all(v["cpu_us_per_line"] >= 0 for v in nodes.values()), nodes
    ceiling = run["ceiling"]
    assert ceiling["busiest_master"] in masters and ceiling["masters"] == 3, ceiling
    assert ceiling["busiest_cpu_s"] == max(v["cpu_s"] for v in masters.values()), ceiling
    # The busiest master's CPU is at least a third of all the masters', so the ceiling is at most
    # three times the per-core rate (rounding aside).
    per_core, whole = ceiling["lines_per_s_per_redis_core"], ceiling["cluster_ceiling_lines_per_s"]
    assert per_core <= whole <= 3 * per_core * 1.01, ceiling
    assert set(run["cpu"]) == {"web", "worker-1", "worker-2", "finalizer", "total"}, sorted(run["cpu"])


def _check_spread(scenario: dict) -> None:
    """The spread scenario: the cluster scenario's 16 batches on one Redis, its calls per line by command."""
    assert scenario["reference"] is None and scenario["targets"] == []
    (run,) = scenario["sluice_runs"]
    lines = scenario["config"]["lines"]
    assert run["output"]["output_lines"] == lines and run["redis"] == "single"
    assert sorted(b["shard"] for b in run["batches"]) == list(range(16)), run["batches"]
    ((_, node),) = run["redis_nodes"].items()
    assert node["role"] == "master" and node["shards"] == 16 and node["share"] == 1.0, node
    per_line, every = run["redis_calls_per_line"], run["redis_calls_per_line_all"]
    assert len(per_line) <= 12 and per_line["total"] == every["total"] > 0, per_line
    assert every["xadd"] >= 2, every  # each line's request and its result, at least


def test_png_chart_is_written(smoke_run):
    out = smoke_run.out
    charts = list(out.glob("bench-*.png"))
    assert len(charts) == 1, charts
    assert charts[0].read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "latest.png").read_bytes()[:8] == PNG_SIGNATURE
