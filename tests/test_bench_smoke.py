"""The benchmark harness runs end to end: ``python -m bench.run --smoke`` in a subprocess.

Only the shape of the results is checked, never the timings: the smoke scenarios are too small
for their numbers to mean anything, and CI machines vary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"latency", "overhead", "bigfile", "scaling"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 240

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RUN_TIMEOUT_S + 30)]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One smoke run shared by the module's tests: its completed process and output directory."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    return proc, out


def _report(out: Path) -> dict:
    runs = list(out.glob("bench-*.json"))
    assert len(runs) == 1, f"expected one bench-*.json in {out}, found {runs}"
    assert (out / "latest.json").read_bytes() == runs[0].read_bytes()
    return json.loads(runs[0].read_text())


def test_smoke_run_succeeds(smoke_run):
    proc, _ = smoke_run
    assert proc.returncode == 0, f"bench exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for name in SCENARIOS:
        assert f"=== {name}:" in proc.stdout, f"no table for {name}:\n{proc.stdout}"


def test_json_has_every_scenario_with_throughput_and_cpu(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stderr
    report = _report(out)
    assert report["ok"] is True and report["smoke"] is True
    by_name = {s["name"]: s for s in report["scenarios"]}
    assert set(by_name) == SCENARIOS
    for name, scenario in by_name.items():
        assert "error" not in scenario, f"{name}: {scenario.get('error')}"
        assert scenario["reference"]["lines_per_s"] > 0, name
        assert scenario["reference"]["cpu"]["seconds"] >= 0, name
        assert scenario["targets"] and all(isinstance(t["pass"], bool) for t in scenario["targets"]), name
        for run in scenario["sluice_runs"]:
            assert run["lines_per_s"] > 0, f"{name} {run['label']}"
            assert run["output"]["output_lines"] == scenario["config"]["lines"]
            expected = {"web", "finalizer", "redis-server", "total"} | {
                f"worker-{i}" for i in range(1, run["workers"] + 1)}
            assert set(run["cpu"]) == expected, f"{name} {run['label']}: {sorted(run['cpu'])}"
            for proc_name, cpu in run["cpu"].items():
                assert cpu["seconds"] >= 0 and cpu["per_1000_lines"] >= 0, f"{name} {proc_name}: {cpu}"
            for proc_name, rss in run["rss_mb"].items():
                assert rss["hwm"] and rss["hwm"] > 0, f"{name} {proc_name}: {rss}"
    assert [r["workers"] for r in by_name["scaling"]["sluice_runs"]] == [1, 2]


def test_png_chart_is_written(smoke_run):
    _, out = smoke_run
    charts = list(out.glob("bench-*.png"))
    assert len(charts) == 1, charts
    assert charts[0].read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "latest.png").read_bytes()[:8] == PNG_SIGNATURE
