"""What the processes log: JSON lines, the batch / line / provider / attempt on every line about
a request, and never a secret (API tokens, the upstream key, the server secret) nor a request or
response body.

(``test_flow_control.py`` checks the same for client-supplied BYOK keys and configured provider keys.)
"""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKENS = (f"tok-logs-{uuid.uuid4().hex}", f"sk-sluice-logs{uuid.uuid4().hex}")
UPSTREAM_KEY = f"upstream-logs-{uuid.uuid4().hex}"
SERVER_SECRET = f"server-secret-logs-{uuid.uuid4().hex}"
SLUICE_PROCESSES = ("web", "worker-1", "worker-2", "finalizer")


def _records(stack, name: str) -> list[dict]:
    text = stack.process(name).log_path.read_text()
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))  # not on a terminal: every line is JSON
    return records


def test_no_secret_nor_body_in_the_logs(stack_factory):
    stack = stack_factory.start(
        name="log-secrets",
        tokens=TOKENS,
        env={
            "SLUICE_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "SLUICE_SECRET_KEY": SERVER_SECRET,
            "SLUICE_MAX_ATTEMPTS": "2",
            "SLUICE_LOG_LEVEL": "debug",  # the most talkative level: still no secret, no body
        },
    )
    run = uuid.uuid4().hex[:8]
    content = f"private prompt {uuid.uuid4().hex}"
    rows = [stack.chat_line(f"ok-{run}-{i}", f"{content} {i}") for i in range(10)]
    rows += [
        stack.chat_line(f"retry-{run}", content, mock_status=500, mock_fail_times=1),  # retried, then fine
        stack.chat_line(f"paused-{run}", content, mock_status=429, mock_fail_times=1),  # pauses the provider
        stack.chat_line(f"gaveup-{run}", content, mock_status=503),  # 2 attempts, then given up
        stack.chat_line(f"final-{run}", content, mock_status=404),  # final at once
    ]
    byok_keys = []
    for token in TOKENS:
        client = stack.client(token=token)
        _, created = stack.submit(rows, client=client)
        batch = stack.wait_for_batch(created.id, client=client, timeout=60)
        assert batch.status == "completed", batch
        assert batch.request_counts.completed == 12 and batch.request_counts.failed == 2, batch.request_counts
        # A BYOK batch: the client's key travels in a header and is sealed with the server secret.
        byok_keys.append(f"sk-client-{uuid.uuid4().hex}")
        f = stack.upload_jsonl([stack.chat_line(f"byok-{run}", content)], client=client)
        byok = stack.create_batch(
            f.id, client=client, extra_headers={"x-sluice-provider": "default", "x-sluice-provider-key": byok_keys[-1]}
        )
        assert stack.wait_for_batch(byok.id, client=client, timeout=30).status == "completed"
    # Rejected tokens go through the auth path's logging, if any.
    assert stack.http("GET", "/v1/batches", token=f"sk-wrong-{uuid.uuid4().hex}").status == 401
    assert stack.http("GET", "/v1/batches", token=UPSTREAM_KEY).status == 401

    # Stop the Sluice processes first, so every log is complete.
    stack.runner.stop([p for p in stack.processes if p.name in SLUICE_PROCESSES])
    for secret in (*TOKENS, UPSTREAM_KEY, SERVER_SECRET, *byok_keys):
        assert stack.logs_containing(secret) == [], f"{secret!r} appears in a process log"
    leaked_body = [n for n in stack.logs_containing(content) if n in SLUICE_PROCESSES]
    assert leaked_body == [], f"a request body appears in the logs of {leaked_body}"
    assert [n for n in stack.logs_containing("mock_error") if n in SLUICE_PROCESSES] == [], (
        "a provider's response body appears in a log"
    )

    records = {name: _records(stack, name) for name in SLUICE_PROCESSES}
    worker = records["worker-1"] + records["worker-2"]
    by_event: dict[str, list[dict]] = {}
    for r in worker:
        by_event.setdefault(r["event"], []).append(r)
    for event in ("upstream_retry", "provider_paused", "upstream_gave_up", "line_done"):
        assert by_event.get(event), f"no {event} line in the worker logs"
        for r in by_event[event]:
            assert r["batch_id"].startswith("batch_") and r["custom_id"] and r["provider"] == "default", r
            if event != "line_done":
                assert isinstance(r["attempt"], int) and r["attempt"] >= 1, r
    assert {r["custom_id"] for r in by_event["upstream_gave_up"]} == {f"gaveup-{run}"}
    assert {r["attempt"] for r in by_event["upstream_gave_up"]} == {2}
    assert f"retry-{run}" in {r["custom_id"] for r in by_event["upstream_retry"]}
    # The web process logs each batch's validation, the finalizer each batch's end, with its id.
    assert len([r for r in records["web"] if r["event"] == "validated" and r.get("batch_id")]) == 4
    assert len([r for r in records["finalizer"] if r["event"] == "batch_finished" and r.get("batch_id")]) == 4
    for name, rs in records.items():
        for r in rs:
            assert {"event", "level", "timestamp", "process"} <= r.keys(), (name, r)
