"""Cancelling batches: partial results, ``batch_cancelled`` lines, and 409 on finished batches.

Own stack (2 workers x 2 requests in flight) so that the mock's counters belong to these tests.
Lines that must still be running when the cancel lands wait at the mock's gate until the test
releases them: no outcome depends on how fast the machine is.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LINES = 40
SLOTS = 4  # 2 workers x 2 requests in flight


@pytest.fixture(scope="module")
def cstack(module_stack_factory):
    return module_stack_factory.start(name="cancel", workers=2, worker_concurrency=2, mock={"gates": True})


def test_cancel_mid_way_keeps_partial_results(cstack, wait_until):
    client = cstack.client()
    cstack.mock_reset()
    run = uuid.uuid4().hex[:8]
    messages = {f"c-{run}-{i:02d}": f"cancel me {i}" for i in range(LINES)}
    gate = f"cancel-{run}"
    rows = [cstack.chat_line(cid, msg, mock_hold=gate) for cid, msg in messages.items()]
    _, created = cstack.submit(rows, client=client)

    # Cancel while every worker slot holds a line at the gate: nothing else can have been sent.
    cstack.mock().wait_held(gate, SLOTS)
    resp = client.batches.cancel(created.id)
    assert resp.id == created.id
    assert resp.status in ("cancelling", "cancelled"), resp
    assert resp.cancelling_at is not None, resp
    cstack.mock().release(gate)  # the lines in flight finish; the others must never be sent

    batch = cstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "cancelled", batch
    assert batch.cancelling_at == resp.cancelling_at
    assert batch.cancelled_at is not None and batch.cancelled_at >= batch.cancelling_at >= batch.created_at, batch
    assert batch.completed_at is None and batch.failed_at is None, batch
    assert batch.in_progress_at is not None and batch.in_progress_at <= batch.cancelling_at, batch

    output, errors = cstack.results(batch, client=client)
    counts = batch.request_counts
    assert counts.total == LINES
    assert counts.completed == len(output), (counts, len(output))
    assert counts.failed == len(errors), (counts, len(errors))
    assert len(output) + len(errors) == LINES

    seen = Counter(line["custom_id"] for line in output + errors)
    assert set(seen) == set(messages) and set(seen.values()) == {1}, seen

    cancelled = [line for line in errors if (line.get("error") or {}).get("code") == "batch_cancelled"]
    assert cancelled, "no batch_cancelled lines: the batch was not cancelled mid-way"
    for line in cancelled:
        assert line["response"] is None, line
        assert isinstance(line["error"]["message"], str), line
        assert line["id"].startswith("batch_req_"), line
    assert len(cancelled) == len(errors), "only cancelled lines may be errors here (the mock answers 200)"

    assert output, "no partial results: requests in flight at cancel time must drain into the output file"
    assert batch.output_file_id and batch.error_file_id
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]

    stats = cstack.mock_stats()
    assert stats["in_flight"] == 0, stats
    assert stats["requests"] < LINES, stats
    assert stats["requests"] == LINES - len(cancelled), (
        f"the mock saw {stats['requests']} requests but {LINES - len(cancelled)} lines were not cancelled"
    )

    # Cancelling again is idempotent: 200 with the current object.
    again = client.batches.cancel(batch.id)
    assert again.status == "cancelled" and again.cancelled_at == batch.cancelled_at


def _assert_409_not_retryable(stack, batch_id: str, status: str) -> None:
    client = stack.client()
    with pytest.raises(openai.ConflictError) as info:
        client.batches.cancel(batch_id)
    stack.assert_error(info.value, 409)
    assert info.value.response.headers.get("x-should-retry") == "false"

    res = stack.http("POST", f"/v1/batches/{batch_id}/cancel", headers={"Content-Type": "application/json"})
    stack.assert_error(res, 409)
    assert res.headers.get("x-should-retry") == "false", dict(res.headers)
    res = stack.http("POST", f"/batches/{batch_id}/cancel")
    assert res.status == 409 and res.headers.get("x-should-retry") == "false"

    after = client.batches.retrieve(batch_id)
    assert after.status == status and after.cancelling_at is None and after.cancelled_at is None, after


def test_cancel_completed_batch_is_409(cstack):
    run = uuid.uuid4().hex[:8]
    _, created = cstack.submit([cstack.chat_line(f"done-{run}", "finished")])
    batch = cstack.wait_for_batch(created.id)
    assert batch.status == "completed", batch
    _assert_409_not_retryable(cstack, batch.id, "completed")


def test_cancel_failed_batch_is_409(cstack):
    run = uuid.uuid4().hex[:8]
    good = cstack.chat_line(f"fail-{run}", "ok")
    _, created = cstack.submit([good, json.dumps({**good, "custom_id": f"fail2-{run}", "method": "GET"})])
    batch = cstack.wait_for_batch(created.id)
    assert batch.status == "failed", batch
    _assert_409_not_retryable(cstack, batch.id, "failed")


def test_cancel_right_after_create(cstack):
    """Cancel while the batch is (most likely) still validating: whatever the timing, nothing is lost."""
    client = cstack.client()
    cstack.mock_reset()
    run = uuid.uuid4().hex[:8]
    gate = f"early-{run}"
    rows = [cstack.chat_line(f"early-{run}-{i:04d}", f"early {i}", mock_hold=gate) for i in range(3000)]
    _, created = cstack.submit(rows, client=client)
    resp = client.batches.cancel(created.id)
    assert resp.status in ("cancelling", "cancelled"), resp
    assert resp.cancelling_at is not None
    cstack.mock().release(gate)  # until now at most one line per worker slot could reach the mock

    batch = cstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "cancelled", batch
    assert batch.cancelled_at is not None and batch.completed_at is None
    output, errors = cstack.results(batch, client=client)
    assert batch.request_counts.total in (0, 3000), batch.request_counts
    assert len(output) + len(errors) == batch.request_counts.total
    assert batch.request_counts.completed == len(output) and batch.request_counts.failed == len(errors)
    assert all(line["error"]["code"] == "batch_cancelled" and line["response"] is None for line in errors)
    stats = cstack.mock_stats()
    assert stats["in_flight"] == 0
    assert stats["requests"] == len(output), (stats, len(output))
    assert stats["requests"] <= SLOTS, f"{stats['requests']} requests sent after an immediate cancel"
