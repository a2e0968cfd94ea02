"""Process lifecycle: graceful SIGTERM, restarts, and a worker killed mid-batch."""

from __future__ import annotations

import signal
import uuid
from collections import Counter

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SLUICE_ROLES = ("web", "worker", "finalizer")


def _assert_exactly_once(stack, batch, messages: dict[str, str]) -> None:
    output, errors = stack.results(batch)
    assert errors == [], errors[:3]
    counts = Counter(line["custom_id"] for line in output)
    assert set(counts) == set(messages), set(counts) ^ set(messages)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    assert batch.request_counts.total == batch.request_counts.completed == len(messages)


def test_sigterm_mid_batch_then_restart(stack_factory, wait_until):
    stack = stack_factory.start(name="restart", workers=2, worker_concurrency=4)
    run = uuid.uuid4().hex[:8]
    messages = {f"rs-{run}-{i:02d}": f"restart {i}" for i in range(40)}
    rows = [stack.chat_line(cid, msg, mock_latency_ms=300) for cid, msg in messages.items()]
    _, created = stack.submit(rows)
    wait_until(lambda: stack.mock_stats()["in_flight"] >= 1, timeout=30, check=stack.check_alive)

    sluice = [p for p in stack.processes if p.name.split("-")[0] in SLUICE_ROLES]
    assert len(sluice) == 4
    for p in sluice:
        p.stopping = True
        p.signal(signal.SIGTERM)
    # SLUICE_SHUTDOWN_GRACE_S is 2 in test stacks: every process must be gone by itself, with 0 (the
    # bound is ten times the grace: a failure deadline on a loaded machine, not a speed check).
    wait_until(lambda: not any(p.alive for p in sluice), timeout=20, message=lambda: [p.describe() for p in sluice])
    assert [p.returncode for p in sluice] == [0] * 4, [p.describe() for p in sluice]

    stack.spawn("web")
    stack.spawn("worker")
    stack.spawn("worker")
    stack.spawn("finalizer")
    stack.wait_healthy()

    batch = stack.wait_for_batch(created.id, timeout=60)
    assert batch.status == "completed", batch
    _assert_exactly_once(stack, batch, messages)
    assert stack.mock_stats()["requests"] >= len(messages)


def test_sigterm_with_every_slot_taken_drains_within_the_grace(stack_factory, wait_until):
    # Every slot of the one worker is held at the mock's gate, which opens only after the worker
    # is gone: it must start its drain at the SIGTERM (not once some call ends), hand the lines
    # back when the grace (2 s in test stacks) runs out, and exit with 0.
    stack = stack_factory.start(name="fullstop", workers=1, worker_concurrency=2, mock={"gates": True})
    run = uuid.uuid4().hex[:8]
    gate = f"full-{run}"
    messages = {f"full-{run}-{i}": f"held {i}" for i in range(4)}
    _, created = stack.submit([stack.chat_line(cid, msg, mock_hold=gate) for cid, msg in messages.items()])
    stack.mock().wait_held(gate, 2)

    worker = stack.process("worker-1")
    worker.stopping = True
    worker.signal(signal.SIGTERM)
    # A failure deadline (ten times the grace, on a loaded machine), not a speed check: before,
    # the worker waited on the gate for as long as it stayed shut.
    wait_until(lambda: not worker.alive, timeout=20, message=worker.describe)
    assert worker.returncode == 0, worker.describe()
    assert '"left_unfinished"' in worker.tail(200), worker.tail(40)

    stack.mock().release(gate)
    stack.spawn("worker")
    batch = stack.wait_for_batch(created.id, timeout=60)
    assert batch.status == "completed", batch
    _assert_exactly_once(stack, batch, messages)


def test_worker_killed_mid_batch_work_is_reclaimed(stack_factory, wait_until):
    # Recording: the mock keeps every request that arrived, the dead worker's (never answered) included.
    stack = stack_factory.start(
        name="kill", workers=2, worker_concurrency=4, env={"SLUICE_LEASE_S": "2"}, mock={"gates": True, "record": True}
    )
    run = uuid.uuid4().hex[:8]
    gate = f"kill-{run}"
    messages = {f"kill-{run}-{i:02d}": f"survive {i}" for i in range(40)}
    rows = [stack.chat_line(cid, msg, mock_hold=gate) for cid, msg in messages.items()]
    _, created = stack.submit(rows)
    # Both workers' slots full (4 each), held at the gate: the victim certainly has lines in flight.
    stack.mock().wait_held(gate, 8)

    victim = stack.process("worker-1")
    victim.stopping = True
    victim.signal(signal.SIGKILL)
    victim.popen.wait(timeout=30)
    stack.mock().release(gate)

    batch = stack.wait_for_batch(created.id, timeout=90)
    assert batch.status == "completed", batch
    _assert_exactly_once(stack, batch, messages)
    # The survivor sent the dead worker's lines again, once their lease ran out.
    sent = stack.mock().requests()
    assert len(sent) > len(messages), f"no request was redelivered after the kill: {len(sent)} requests"
