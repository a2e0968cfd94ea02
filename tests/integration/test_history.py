"""The per-minute history (``GET /v1/sluice/history``) lives in Redis: a restart of every Sluice process
keeps it, and it counts exactly what the batches recorded."""

from __future__ import annotations

import signal
import uuid

import pytest

from service.core import keys

pytestmark = [pytest.mark.integration, pytest.mark.single_redis, pytest.mark.timeout(180)]

ROLES = ("web", "worker", "finalizer")


def _sums(history: dict) -> dict:
    """Each series of the history summed over its minutes (None entries skipped)."""

    def total(series: dict) -> dict:
        return {
            name: sum(v for v in values if v is not None)
            for name, values in series.items()
            if not name.startswith("latency")
        }

    return {"total": total(history["total"]), **{p: total(s) for p, s in history["providers"].items()}}


def restart_every_sluice_process(stack) -> None:
    """SIGKILL every web, worker and finalizer process and start the same set again."""
    victims = [p for p in stack.processes if p.name.split("-")[0] in ROLES and p.alive and not p.stopping]
    for p in victims:
        p.stopping = True
        p.signal(signal.SIGKILL)
    for p in victims:
        p.popen.wait(timeout=10)
    for p in victims:
        stack.spawn(p.name.split("-")[0])
    stack.wait_healthy()


def test_history_counts_the_batches_and_survives_a_restart_of_every_process(stack_factory, wait_until):
    stack = stack_factory.start(name="history", workers=1)
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"ok-{run}-{i:02d}", f"fine {i}") for i in range(26)]
    rows += [stack.chat_line(f"bad-{run}-{i}", "refused", mock_status=400) for i in range(3)]
    rows.append(stack.chat_line(f"throttled-{run}", "throttled", mock_status=429, mock_fail_times=1))
    _, created = stack.submit(rows)
    batch = stack.wait_for_batch(created.id, timeout=60)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (27, 3), batch

    res = stack.http("GET", "/v1/sluice/history?minutes=10")
    assert res.status == 200, res.body
    before = res.json()
    assert before["object"] == "sluice.history" and len(before["minutes"]) == 10
    sums = _sums(before)
    assert (sums["total"]["completed"], sums["total"]["failed"]) == (27, 3), sums
    # 30 lines, one of which was answered 429 once first.
    assert sums["default"] == {"completed": 27, "failed": 3, "requests": 31, "rate_limited": 1}, sums
    assert any(v is not None for v in before["providers"]["default"]["latency_p50_s"])

    r = stack.redis.client()
    try:
        # The batch's shard holds its minutes (listed in its index); every history key expires.
        index = keys.history_index(keys.shard_of(created.id))
        minutes = [int(m) for m in r.zrange(index, 0, -1)]
        assert minutes and all(r.exists(keys.history(keys.shard_of(created.id), m)) for m in minutes)
        history_keys = list(r.scan_iter("sluice:*history*"))
        assert history_keys and all(0 < r.ttl(k) <= 24 * 3600 + 120 for k in history_keys)
    finally:
        r.close()

    restart_every_sluice_process(stack)
    after = stack.http("GET", "/v1/sluice/history?minutes=10").json()
    assert _sums(after) == sums
    # The restarted processes count on into the same history.
    _, second = stack.submit([stack.chat_line(f"again-{run}-{i}", "again") for i in range(5)])
    assert stack.wait_for_batch(second.id, timeout=60).status == "completed"
    assert _sums(stack.http("GET", "/v1/sluice/history?minutes=10").json())["total"]["completed"] == 32
