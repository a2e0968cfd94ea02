"""Concurrency bound measured at the upstream, upstream credentials, and fairness between batches."""

from __future__ import annotations

import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_in_flight_bound_across_workers_and_upstream_auth(stack_factory):
    stack = stack_factory.start(name="bound", workers=2, worker_concurrency=4, mock={"latency_ms": 100, "gates": True})
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    gate = f"cc-{run}"
    rows = [stack.chat_line(f"cc-{run}-{i:03d}", f"parallel {i}", mock_hold=gate) for i in range(200)]
    _, created = stack.submit(rows, client=client)
    # Every slot of both workers fills up at the gate (and no more: the mock would see a 9th there).
    stack.mock().wait_held(gate, 8)
    assert stack.mock().held() == {gate: 8}
    stack.mock().release(gate)

    batch = stack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 200 and batch.request_counts.failed == 0, batch.request_counts
    output = stack.read_file(batch.output_file_id, client=client)
    assert sorted(line["custom_id"] for line in output) == sorted(r["custom_id"] for r in rows)

    stats = stack.mock_stats()
    assert stats["requests"] == 200, stats
    assert stats["by_status"] == {"200": 200}, stats
    assert stats["max_in_flight"] <= 8, f"more than 2 workers x 4 requests in flight: {stats['max_in_flight']}"
    assert stats["max_in_flight"] >= 5, (
        f"max_in_flight {stats['max_in_flight']}: requests did not run in parallel across both workers"
    )
    assert stats["authorization"] == ["Bearer upstream-secret"], stats["authorization"]
    assert stats["in_flight"] == 0


def test_small_batch_is_not_stuck_behind_a_big_one(stack_factory, wait_until):
    stack = stack_factory.start(
        name="fairness", workers=2, worker_concurrency=8, mock={"latency_ms": 100, "gates": True}
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    # The big batch's last line waits at the gate: it cannot finish before the test is done with it.
    gate = f"big-{run}"
    big_rows = [
        stack.chat_line(f"big-{run}-{i:04d}", f"big {i}", **({"mock_hold": gate} if i == 2999 else {}))
        for i in range(3000)
    ]
    _, big = stack.submit(big_rows, client=client)

    # The big batch is running (and occupying the workers) before the small one exists.
    running = stack.wait_for_batch(
        big.id, client=client, statuses={"in_progress", "completed", "failed", "cancelled", "expired"}, timeout=60
    )
    assert running.status == "in_progress", running
    wait_until(
        lambda: stack.mock_stats()["in_flight"] >= 8,
        timeout=30,
        message="the big batch to fill the workers",
        check=stack.check_alive,
    )

    small_rows = [stack.chat_line(f"small-{run}-{i}", f"small {i}") for i in range(10)]
    _, small = stack.submit(small_rows, client=client)
    assert small.created_at >= big.created_at

    small_done = stack.wait_for_batch(small.id, client=client, timeout=60)
    big_now = client.batches.retrieve(big.id)
    assert small_done.status == "completed", small_done
    assert small_done.request_counts.completed == 10
    assert big_now.status == "in_progress", f"the big batch is {big_now.status}: the small one waited for it"
    assert big_now.request_counts.completed + big_now.request_counts.failed < 3000, big_now.request_counts

    output = stack.read_file(small_done.output_file_id, client=client)
    by_id = {r["custom_id"]: r["body"]["messages"][0]["content"] for r in small_rows}
    assert sorted(line["custom_id"] for line in output) == sorted(by_id)
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + by_id[line["custom_id"]]

    # Stop the big batch instead of waiting for it; its results still add up.
    client.batches.cancel(big.id)
    stack.mock().release(gate)
    big_done = stack.wait_for_batch(big.id, client=client, timeout=60)
    assert big_done.status == "cancelled", big_done
    out, err = stack.results(big_done, client=client)
    assert len(out) + len(err) == 3000 == big_done.request_counts.total
