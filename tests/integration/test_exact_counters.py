"""The cluster counters are exact whatever is killed: SIGKILL every role (web, workers, finalizer) and
Redis (AOF on) while batches run, one of them cancelled midway; once every batch is terminal,
``sluice_lines_total`` by outcome equals the sum of the batches' ``request_counts``, the upstream
requests equal what the result files say, and the per-minute history agrees.

``SLUICE_CHAOS_SEED`` replays one kill schedule.
"""

from __future__ import annotations

import os
import random
import time
import uuid

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TERMINAL = ("completed", "failed", "cancelled", "expired")
# (role, fraction of the running batches' lines done when it is killed); the web process also dies
# first, while it validates and feeds.
SCHEDULE = (("worker", 0.15), ("finalizer", 0.3), ("redis", 0.45), ("worker", 0.6), ("web", 0.7), ("finalizer", 0.8))


def _retrieve(client, batch_id: str):
    try:
        return client.batches.retrieve(batch_id)
    except (openai.APIConnectionError, openai.InternalServerError):
        return None  # the web process is down for a moment


def _metrics(stack) -> dict[tuple, float]:
    res = stack.http("GET", "/metrics", token=None)
    assert res.status == 200, res.body[:300]
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(res.body.decode())
        for s in f.samples
    }


def test_counters_stay_exact_when_every_role_is_killed(stack_factory, wait_until):
    seed = int(os.environ.get("SLUICE_CHAOS_SEED", str(int(time.time() * 1000) % 1_000_000)))
    rng = random.Random(seed)
    print(f"exact-counters seed {seed}")
    stack = stack_factory.start(
        name="exact",
        workers=2,
        worker_concurrency=16,
        mock_latency_ms=30,
        redis_aof=True,
        env={"SLUICE_LEASE_S": "2", "SLUICE_MAX_ATTEMPTS": "8", "SLUICE_WINDOW_LINES": "300"},
    )
    client = stack.client(timeout=10)
    run = uuid.uuid4().hex[:8]

    def rows(name: str, n: int, **extra) -> list[dict]:
        out = []
        for i in range(n):
            cid = f"{name}-{run}-{i:05d}"
            roll = rng.random()
            fault = (
                {"mock_status": 400}
                if roll < 0.03
                else {"mock_status": 500, "mock_fail_times": 2}
                if roll < 0.06
                else {"mock_status": 429, "mock_fail_times": 1}
                if roll < 0.063
                else {}
            )
            out.append(stack.chat_line(cid, f"{name} {i}", **fault, **extra))
        return out

    _, a = stack.submit(rows("a", 1500), client=client)
    _, b = stack.submit(rows("b", 1000), client=client)
    # Slow lines, cancelled midway: the finalizer records the lines never sent as failed.
    _, c = stack.submit(rows("c", 400, mock_latency_ms=400), client=client)
    running = (a.id, b.id)
    total = 2500

    stack.kill_and_replace("web")

    def c_started() -> bool:
        batch = _retrieve(client, c.id)
        return batch is not None and batch.request_counts.completed + batch.request_counts.failed >= 30

    wait_until(
        c_started, timeout=120, interval=0.1, message=f"batch {c.id} to run (seed {seed})", check=stack.check_alive
    )
    client.batches.cancel(c.id)
    for role, fraction in SCHEDULE:
        target = int(fraction * total)

        def progress() -> bool:
            done = 0
            for batch_id in running:
                batch = _retrieve(client, batch_id)
                if batch is None:
                    return False
                done += batch.request_counts.completed + batch.request_counts.failed
            return done >= target  # noqa: B023 (called at once, within this iteration)

        wait_until(
            progress, timeout=120, interval=0.1, message=f"{target} results (seed {seed})", check=stack.check_alive
        )
        stack.kill_and_replace(role)

    finals = {}
    for batch_id in (a.id, b.id, c.id):
        finals[batch_id] = wait_until(
            lambda batch_id=batch_id: (x := _retrieve(client, batch_id)) is not None and x.status in TERMINAL and x,
            timeout=180,
            interval=0.2,
            message=f"batch {batch_id} to end (seed {seed})",
            check=stack.check_alive,
        )
    assert [finals[x].status for x in (a.id, b.id, c.id)] == ["completed", "completed", "cancelled"], (seed, finals)
    assert finals[c.id].request_counts.total == 400 and finals[c.id].request_counts.failed > 0, finals[c.id]

    completed = sum(x.request_counts.completed for x in finals.values())
    failed = sum(x.request_counts.failed for x in finals.values())
    m = _metrics(stack)
    counted = (
        m.get(("sluice_lines_total", ("outcome", "completed")), 0),
        m.get(("sluice_lines_total", ("outcome", "failed")), 0),
    )
    print(
        f"seed {seed}: request_counts completed={completed} failed={failed}; "
        f"sluice_lines_total completed={counted[0]:.0f} failed={counted[1]:.0f}; "
        f"error {counted[0] - completed:+.0f} / {counted[1] - failed:+.0f}"
    )
    assert counted == (completed, failed), f"seed {seed}"

    # Upstream requests: every completed line has exactly one 200 recorded, every line failed by a
    # 400 one 400 (the result files say which); 429s only ever precede a retry.
    statuses: dict[int, int] = {}
    for batch in finals.values():
        output, errors = stack.results(batch, client=client)
        for line in output + errors:
            if line.get("response"):
                code = line["response"]["status_code"]
                statuses[code] = statuses.get(code, 0) + 1
    requests = {
        labels[1][1]: v
        for (name, *labels), v in m.items()
        if name == "sluice_upstream_requests_total" and labels[0] == ("provider", "default")
    }
    assert requests.get("200", 0) == statuses.get(200, 0) == completed, (seed, requests, statuses)
    assert requests.get("400", 0) == statuses.get(400, 0), (seed, requests, statuses)
    assert m[("sluice_upstream_rate_limited_total", ("provider", "default"))] == requests.get("429", 0)

    history = stack.http("GET", "/v1/sluice/history?minutes=30").json()
    assert (sum(history["total"]["completed"]), sum(history["total"]["failed"])) == (completed, failed), seed
    assert sum(history["providers"]["default"]["requests"]) == sum(requests.values()), seed
