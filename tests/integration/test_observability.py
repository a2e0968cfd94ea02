"""Observability of the whole cluster: ``GET /metrics``, heartbeats, ``sluice status``, ``/readyz``.

One stack (web, 2 workers, the finalizer) runs a batch with forced final failures, a transient 500
and a 429; the metrics any web process serves must then match the batch, show the web process,
both workers and the finalizer live, and show a SIGKILLed worker as stale, in /metrics and in
``sluice status``.
"""

from __future__ import annotations

import signal
import sys
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import http_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

H = "sluice_upstream_request_duration_seconds"


def _scrape(stack, **kw) -> dict[str, list]:
    res = stack.http("GET", "/metrics", token=None, **kw)
    assert res.status == 200, res.body[:500]
    assert res.content_type.startswith("text/plain"), res.content_type
    return {f.name: f.samples for f in text_string_to_metric_families(res.body.decode())}


def _get(fams: dict[str, list], family: str, sample: str | None = None, **labels) -> float:
    """The value of one sample (0 when absent)."""
    for s in fams.get(family, []):
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


@pytest.mark.single_redis
def test_metrics_status_heartbeats_and_readiness(stack_factory, wait_until):
    # The running batch below holds its lines at the mock's gate: it stays running while observed.
    stack = stack_factory.start(
        name="observe",
        workers=2,
        worker_concurrency=8,
        mock={"gates": True},
        env={"SLUICE_READYZ_STORAGE_CACHE_S": "1"},
    )
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"ok-{run}-{i:02d}", f"fine {i}") for i in range(20)]
    rows += [stack.chat_line(f"bad-{run}-{i}", f"bad {i}", mock_status=400) for i in range(3)]
    rows.append(stack.chat_line(f"flaky-{run}", "flaky", mock_status=500, mock_fail_times=1))
    rows.append(stack.chat_line(f"throttled-{run}", "throttled", mock_status=429, mock_fail_times=1))
    _, created = stack.submit(rows)
    batch = stack.wait_for_batch(created.id, timeout=60)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.completed, counts.failed) == (22, 3), counts

    # The counters move with each recorded line: exact as soon as the batch is terminal.
    fams = _scrape(stack)
    assert _get(fams, "sluice_lines", "sluice_lines_total", outcome="completed") == counts.completed
    assert _get(fams, "sluice_lines", "sluice_lines_total", outcome="failed") == counts.failed
    for status, n in (("200", 22), ("400", 3), ("500", 1), ("429", 1)):
        assert _get(fams, H, H + "_count", provider="default", status=status) == n, (status, fams[H])
        assert _get(fams, H, H + "_bucket", provider="default", status=status, le="+Inf") == n
        assert (
            _get(fams, "sluice_upstream_requests", "sluice_upstream_requests_total", provider="default", status=status)
            == n
        )
    assert _get(fams, H, H + "_sum", provider="default", status="200") > 0
    assert _get(fams, "sluice_upstream_retries", "sluice_upstream_retries_total", provider="default") == 2
    assert _get(fams, "sluice_upstream_rate_limited", "sluice_upstream_rate_limited_total", provider="default") == 1
    assert _get(fams, "sluice_provider_pauses", "sluice_provider_pauses_total", provider="default") == 1
    assert _get(fams, "sluice_processes", role="worker", state="live") == 2
    assert _get(fams, "sluice_processes", role="worker", state="stale") == 0
    assert _get(fams, "sluice_processes", role="finalizer", state="live") == 1
    finalizer = next(s for s in fams["sluice_finalizer_leased_batches"])
    assert finalizer.labels["process"].split("-")[-2] == str(stack.process("finalizer").pid), finalizer
    assert _get(fams, "sluice_finalizer_unleased_batches") == 0
    assert _get(fams, "sluice_processes", role="web", state="live") == 1
    assert _get(fams, "sluice_finalizer_lag_lines") == 0
    assert _get(fams, "sluice_lines_pending") == 0
    # The finished batch has no series left (batch_id labels only for running batches).
    assert not [s for s in fams.get("sluice_batch_lines_waiting", []) if s.labels.get("batch_id") == created.id]

    # A running batch shows its waiting and pending lines.
    gate = f"slow-{run}"
    slow = [stack.chat_line(f"slow-{run}-{i:02d}", f"slow {i}", mock_hold=gate) for i in range(40)]
    _, running = stack.submit(slow)

    def running_visible():
        f = _scrape(stack)
        waiting = _get(f, "sluice_batch_lines_waiting", batch_id=running.id)
        pending = _get(f, "sluice_batch_lines_pending", batch_id=running.id)
        busy = sum(s.value for s in f.get("sluice_worker_lines_in_flight", []))
        leased = _get(f, "sluice_finalizer_leased_batches")  # the only finalizer holds the running batch
        return f if waiting == 40 and pending > 0 and busy > 0 and leased == 1 else None

    fams = wait_until(
        running_visible, timeout=60, interval=0.25, message="the running batch in /metrics", check=stack.check_alive
    )
    assert _get(fams, "sluice_provider_lines_waiting", provider="default") >= 40
    status = stack.sluice("status", check=True).stdout
    assert running.id in status and "/40" in status, status
    assert status.count("LIVE") == 4, status  # web, 2 workers, finalizer
    assert "running (1 batch)" in status, status

    # SIGKILL one worker: it stops heart-beating and shows as stale (and stays listed).
    victim = stack.process("worker-1")
    victim.stopping = True
    victim.signal(signal.SIGKILL)
    victim.popen.wait(timeout=5)

    def stale():
        f = _scrape(stack)
        ok = (
            _get(f, "sluice_processes", role="worker", state="stale") == 1
            and _get(f, "sluice_processes", role="worker", state="live") == 1
        )
        return f if ok else None

    # Stale after 6 s without a heartbeat (service/core/heartbeat.py).
    fams = wait_until(
        stale, timeout=90, interval=0.5, message="the killed worker to show as stale", check=stack.check_alive
    )
    dead = [s for s in fams["sluice_process_up"] if s.value == 0]
    assert len(dead) == 1 and dead[0].labels["role"] == "worker", fams["sluice_process_up"]
    assert dead[0].labels["process"].split("-")[-2] == str(victim.pid), dead
    status = stack.sluice("status", check=True).stdout
    stale_rows = [line for line in status.splitlines() if line.rstrip().endswith("STALE")]
    assert len(stale_rows) == 1 and str(victim.pid) in stale_rows[0], status
    stack.client().batches.cancel(running.id)
    stack.mock().release(gate)

    # /readyz: 200; 503 when storage cannot be read (within its 1 s cache); 503 when Redis does not answer.
    assert stack.http("GET", "/readyz", token=None).status == 200
    files = stack.data_dir / "files"
    assert files.is_dir(), "the local storage layout changed: adapt this test"
    aside = stack.data_dir / "files-aside"
    files.rename(aside)
    files.write_bytes(b"not a directory")  # root ignores permissions, not file types
    try:
        res = wait_until(
            lambda: (r := stack.http("GET", "/readyz", token=None)).status == 503 and r,
            timeout=30,
            interval=0.25,
            message="/readyz to notice the storage outage",
            check=stack.check_alive,
        )
        assert res.json()["redis"] == "ok" and res.json()["storage"] != "ok", res.json()
    finally:
        files.unlink()
        aside.rename(files)
    wait_until(
        lambda: stack.http("GET", "/readyz", token=None).status == 200,
        timeout=30,
        interval=0.25,
        check=stack.check_alive,
    )

    stack.redis.process.signal(signal.SIGSTOP)
    try:
        res = stack.http("GET", "/readyz", token=None, timeout=20)
        assert res.status == 503, res.body
        assert res.json()["redis"] != "ok", res.json()
    finally:
        stack.redis.process.signal(signal.SIGCONT)
    wait_until(
        lambda: stack.http("GET", "/readyz", token=None).status == 200,
        timeout=60,
        interval=0.25,
        check=stack.check_alive,
    )
    assert stack.http("GET", "/healthz", token=None).status == 200


def test_metrics_token(stack_factory):
    stack = stack_factory.start(name="metrics-token", workers=1, env={"SLUICE_METRICS_TOKEN": "scrape-secret"})
    assert stack.http("GET", "/metrics", token=None).status == 401
    assert stack.http("GET", "/metrics").status == 401  # an API token is not the metrics token
    fams = _scrape_with(stack, "scrape-secret")
    assert "sluice_processes" in fams and "sluice_lines" in fams


def _scrape_with(stack, token: str) -> dict[str, list]:
    res = stack.http("GET", "/metrics", token=token)
    assert res.status == 200, res.body[:300]
    return {f.name: f.samples for f in text_string_to_metric_families(res.body.decode())}


def test_web_processes_beat_and_a_killed_one_turns_stale(stack_factory, wait_until, free_port):
    stack = stack_factory.start(name="web-beats", workers=1)
    port = free_port()
    second = stack.runner.start(
        "web-b", [sys.executable, "-m", "service.cli", "web"], env={**stack.env, "PORT": str(port)}
    )
    wait_until(
        lambda: http_request("GET", f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200,
        timeout=30,
        ignore=(OSError,),
        check=stack.check_alive,
        message="the second web process to serve",
    )

    def web_rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("web ")]

    rows = wait_until(
        lambda: len(rows := web_rows(stack.sluice("status", check=True).stdout)) == 2 and rows,
        timeout=20,
        interval=0.25,
        message="both web processes in sluice status",
        check=stack.check_alive,
    )
    assert all(row.rstrip().endswith("LIVE") and "serving" in row for row in rows), rows
    assert {str(stack.process("web").pid), str(second.pid)} == {row.split()[3] for row in rows}, rows

    victim = stack.process("web")
    victim.stopping = True
    victim.signal(signal.SIGKILL)
    victim.popen.wait(timeout=5)

    def stale():
        res = http_request("GET", f"http://127.0.0.1:{port}/metrics", timeout=5)
        f = {fam.name: fam.samples for fam in text_string_to_metric_families(res.body.decode())}
        ok = (
            _get(f, "sluice_processes", role="web", state="stale") == 1
            and _get(f, "sluice_processes", role="web", state="live") == 1
        )
        return f if ok else None

    fams = wait_until(
        stale, timeout=30, interval=0.5, message="the killed web process to show as stale", check=stack.check_alive
    )
    dead = [s for s in fams["sluice_process_up"] if s.value == 0]
    assert [(s.labels["role"], s.labels["process"].split("-")[-2]) for s in dead] == [("web", str(victim.pid))]
    rows = web_rows(stack.sluice("status", check=True).stdout)
    assert [row.split()[3] for row in rows if row.rstrip().endswith("STALE")] == [str(victim.pid)], rows
    cluster = http_request("GET", f"http://127.0.0.1:{port}/v1/sluice/cluster", token=stack.token).json()
    webs = {p["pid"]: p["live"] for p in cluster["processes"] if p["role"] == "web"}
    assert webs == {str(victim.pid): False, str(second.pid): True}, cluster["processes"]
