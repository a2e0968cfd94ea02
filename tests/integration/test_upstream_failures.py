"""What the provider does wrong: transient errors (retried), timeouts, no provider at all, and expiry."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from service.core import keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAX_ATTEMPTS = 3


def _by_custom_id(output: list[dict], errors: list[dict]) -> dict[str, dict]:
    lines = output + errors
    counts = Counter(line["custom_id"] for line in lines)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    return {line["custom_id"]: line for line in lines}


# Far above what an answered request takes even on a loaded machine (milliseconds); a request held
# at the mock's gate is never answered, so it times out whatever the machine's speed.
REQUEST_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def tstack(module_stack_factory):
    """Few attempts, a short request timeout, and an upstream base URL that ends in /v1."""
    return module_stack_factory.start(
        name="transient",
        upstream_suffix="/v1",
        env={"SLUICE_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "SLUICE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)},
        mock={"gates": True},
    )


def test_transient_statuses_are_retried_and_final_ones_are_not(tstack):
    client = tstack.client()
    tstack.mock_reset()
    run = uuid.uuid4().hex[:6]
    plan = {f"ok-{i}": None for i in range(10)}
    plan.update({"s500-a": 500, "s500-b": 500, "s503": 503, "s429": 429, "s400": 400, "s404": 404, "s422": 422})
    rows = []
    for name, status in plan.items():
        extra = {} if status is None else {"mock_status": status}
        rows.append(tstack.chat_line(f"{run}-{name}", f"retry {name}", **extra))
    _, created = tstack.submit(rows, client=client)
    batch = tstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    output, errors = tstack.results(batch, client=client)
    lines = _by_custom_id(output, errors)

    for name, status in plan.items():
        line = lines[f"{run}-{name}"]
        if status is None:
            assert line in output and line["response"]["status_code"] == 200, line
        else:
            assert line in errors, line
            assert line["response"]["status_code"] == status and line["error"] is None, line
            assert line["response"]["body"]["error"]["code"] == "mock_error", line
    assert (batch.request_counts.completed, batch.request_counts.failed) == (10, 7)

    stats = tstack.mock_stats()
    retried = MAX_ATTEMPTS
    assert stats["by_status"] == {
        "200": 10,
        "500": 2 * retried,
        "503": retried,
        "429": retried,
        "400": 1,
        "404": 1,
        "422": 1,
    }, stats["by_status"]
    assert stats["requests"] == 10 + 4 * retried + 3
    # The base URL ended in /v1: the line's url is not appended twice.
    assert stats["paths"] == {"/v1/chat/completions": stats["requests"]}, stats["paths"]


def test_request_timeout(tstack):
    client = tstack.client()
    run = uuid.uuid4().hex[:6]
    rows = [
        tstack.chat_line(f"{run}-fast", "fast"),
        tstack.chat_line(f"{run}-slow", "slow", mock_hold=f"never-{run}"),  # never answered
    ]
    _, created = tstack.submit(rows, client=client)
    batch = tstack.wait_for_batch(created.id, client=client, timeout=MAX_ATTEMPTS * REQUEST_TIMEOUT_S + 60)
    assert batch.status == "completed", batch
    output, errors = tstack.results(batch, client=client)
    lines = _by_custom_id(output, errors)
    assert lines[f"{run}-fast"] in output
    slow = lines[f"{run}-slow"]
    assert slow in errors
    assert slow["response"] is None and slow["error"]["code"] == "request_timeout", slow
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)


def test_unreachable_provider(stack_factory, free_port):
    dead = free_port()  # nothing listens there
    stack = stack_factory.start(
        name="noprovider",
        env={"SLUICE_UPSTREAM_URL": f"http://127.0.0.1:{dead}", "SLUICE_MAX_ATTEMPTS": "2"},
    )
    client = stack.client()
    rows = [stack.chat_line(f"np-{i}", "anyone?") for i in range(4)]
    _, created = stack.submit(rows, client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.output_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 0, 4)
    errors = stack.read_file(batch.error_file_id, client=client)
    assert sorted(line["custom_id"] for line in errors) == [f"np-{i}" for i in range(4)]
    for line in errors:
        assert line["response"] is None and line["error"]["code"] == "upstream_connection_error", line


@pytest.mark.single_redis
def test_expiry(stack_factory, wait_until):
    # The first lines are answered at once, well inside the window; the others wait at the mock's
    # gate until the window has closed, so they certainly cannot finish in time.
    window = 20
    stack = stack_factory.start(
        name="expiry",
        workers=2,
        worker_concurrency=2,
        env={"SLUICE_COMPLETION_WINDOW_S": str(window)},
        mock={"gates": True},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:6]
    gate = f"late-{run}"
    messages = {f"{run}-{i:02d}": f"hurry {i}" for i in range(30)}
    rows = [
        stack.chat_line(cid, m, **({"mock_hold": gate} if i >= 4 else {}))
        for i, (cid, m) in enumerate(messages.items())
    ]
    _, created = stack.submit(rows, client=client)
    assert created.expires_at == created.created_at + window
    stack.mock().wait_held(gate, 4, timeout=window + 60)
    wait_until(
        lambda: time.time() > created.expires_at + 1,
        timeout=window + 60,
        interval=0.2,
        message="the completion window to close",
    )
    stack.mock().release(gate)  # the lines in flight now finish; the unsent ones must not be sent

    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "expired", batch
    assert batch.expired_at is not None and batch.expired_at >= batch.expires_at, batch
    assert batch.completed_at is None and batch.cancelled_at is None and batch.failed_at is None, batch

    output, errors = stack.results(batch, client=client)
    lines = _by_custom_id(output, errors)
    assert set(lines) == set(messages)
    assert output, "requests finished before the window closed must be kept"
    assert errors, "lines held until the window closed cannot have finished in time"
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    for line in errors:
        assert line["response"] is None and line["error"]["code"] == "batch_expired", line
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (30, len(output), len(errors))
    stats = stack.mock_stats()
    # Expired lines were not sent, apart from at most the 4 that were in flight when the window closed.
    assert len(output) <= stats["requests"] <= len(output) + 4, stats

    # Once expired, nothing of the batch stays in Redis without an expiry.
    r = stack.redis.client()
    try:
        unexpiring = [k.decode() for k in r.scan_iter(f"*{created.id}*") if r.ttl(k) == -1]
        assert unexpiring == [], unexpiring
        assert r.ttl(keys.batch(created.id)) > 0
    finally:
        r.close()
