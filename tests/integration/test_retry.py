"""Retrying a finished batch's failed requests: ``POST /v1/batches/{id}/retry`` and ``sluice batches retry``.

Only the failures worth another try are retried (429 and 5xx answers, timeouts, batch_expired,
batch_cancelled; never a 4xx), from the original input lines, in a new batch linked by
``metadata.sluice_retry_of``; ``--wait`` merges its results into the original's result files as
saved locally, every custom_id once with its latest attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
MAX_ATTEMPTS = 2


def _cli(stack, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "OPENAI_")) and k != "REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", SLUICE_URL=stack.base_url, SLUICE_TOKEN=stack.token)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_retry_reruns_only_retryable_failures_and_the_cli_merges_them(stack_factory, tmp_path):
    stack = stack_factory.start(
        name="retry", workers=2, worker_concurrency=8, env={"SLUICE_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    )
    run = uuid.uuid4().hex[:6]
    # Transient faults outlast the batch's attempts (so they end in the error file) but not a retry's.
    transient = {"mock_fail_times": MAX_ATTEMPTS}
    plan = {
        **{f"ok-{i}": {} for i in range(5)},
        "bad-0": {"mock_status": 400},
        "bad-1": {"mock_status": 422},
        "gone": {"mock_status": 404},
        **{f"s500-{i}": {"mock_status": 500, **transient} for i in range(3)},
        "s503": {"mock_status": 503, **transient},
        "s429": {"mock_status": 429, **transient},
    }
    rows = [stack.chat_line(f"{name}-{run}", f"retry {name} {run}", **extra) for name, extra in plan.items()]
    retryable = {f"{name}-{run}" for name in plan if name.startswith("s")}
    final_4xx = {f"{name}-{run}" for name in ("bad-0", "bad-1", "gone")}
    every = {r["custom_id"] for r in rows}
    src = tmp_path / "input.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results"

    submitted = _cli(stack, "submit", str(src), "--wait", "--out", str(out), "--json", "-q")
    assert submitted.returncode == 0, submitted.stderr
    original = json.loads(submitted.stdout)
    client = stack.client()
    first = client.batches.retrieve(original["id"])
    assert (first.status, first.request_counts.completed, first.request_counts.failed) == ("completed", 5, 8), first
    out_file, err_file = out / f"{first.id}_output.jsonl", out / f"{first.id}_error.jsonl"
    assert {x["custom_id"] for x in _lines(err_file)} == retryable | final_4xx

    retried = _cli(
        stack, "batches", "retry", first.id, "--wait", "--out", str(out), "--json", "-q", "--poll-interval", "0.2"
    )
    assert retried.returncode == 0, retried.stderr
    second = client.batches.retrieve(json.loads(retried.stdout)["id"])
    assert second.id != first.id and second.metadata == {"sluice_retry_of": first.id}, second
    assert (second.status, second.request_counts.completed, second.request_counts.failed) == ("completed", 5, 0)
    # Its own input file: the original lines of the retryable failures, nothing else.
    sent = [json.loads(line) for line in client.files.content(second.input_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in sent) == sorted(retryable)
    assert sent == [r for r in rows if r["custom_id"] in retryable]

    merged_out, merged_err = _lines(out_file), _lines(err_file)
    seen = Counter(x["custom_id"] for x in merged_out + merged_err)
    assert set(seen) == every and set(seen.values()) == {1}, f"not every custom_id exactly once: {seen}"
    assert {x["custom_id"] for x in merged_out} == every - final_4xx
    assert {x["custom_id"] for x in merged_err} == final_4xx
    for x in merged_out:
        assert x["response"]["status_code"] == 200, x  # the latest attempt won
    assert not list(out.glob("*.retry")) and not list(out.glob("*.merging")) and not list(out.glob("*.part"))

    # Nothing left to retry: the retry itself had no failures, and the original has only 4xx left to offer.
    again = _cli(stack, "batches", "retry", second.id)
    assert again.returncode != 0 and "nothing to retry" in again.stderr, again
    res = stack.http("POST", f"/v1/batches/{second.id}/retry")
    stack.assert_error(res, 400, code="nothing_to_retry")


def test_retry_states_quotas_and_cancelled_lines(stack_factory, wait_until):
    stack = stack_factory.start(
        name="retry-states",
        workers=2,
        worker_concurrency=1,
        env={"SLUICE_MAX_ATTEMPTS": "1", "SLUICE_SECRET_KEY": "retry-test-secret-0123456789"},
        config_toml="[quotas]\nmax_active_batches = 1\n",
    )
    client = stack.client()
    run = uuid.uuid4().hex[:6]

    # A 4xx is never retried.
    _, only_4xx = stack.submit(
        [stack.chat_line(f"nf-{run}-{i}", "x", mock_status=404) for i in range(2)], client=client
    )
    assert stack.wait_for_batch(only_4xx.id, client=client).status == "completed"
    stack.assert_error(stack.http("POST", f"/v1/batches/{only_4xx.id}/retry"), 400, code="nothing_to_retry")
    # A batch that failed validation ran nothing.
    _, invalid = stack.submit([stack.chat_line(f"iv-{run}", "x"), {"custom_id": f"iv2-{run}"}], client=client)
    assert stack.wait_for_batch(invalid.id, client=client).status == "failed"
    stack.assert_error(stack.http("POST", f"/v1/batches/{invalid.id}/retry"), 400, code="nothing_to_retry")

    # With the client's own provider key (BYOK), which Sluice drops when the batch ends.
    own_key = {"x-sluice-provider": "default", "x-sluice-provider-key": f"sk-client-{run}"}
    flaky_file = stack.upload_jsonl(
        [stack.chat_line(f"fl-{run}-{i}", "x", mock_status=500) for i in range(2)], client=client
    )
    flaky = stack.create_batch(flaky_file.id, client=client, extra_headers=own_key)
    assert stack.wait_for_batch(flaky.id, client=client).status == "completed"

    slow_rows = [stack.chat_line(f"sl-{run}-{i:02d}", f"slow {i}", mock_latency_ms=800) for i in range(12)]
    _, slow = stack.submit(slow_rows, client=client)
    stack.wait_for_batch(slow.id, client=client, statuses={"in_progress"})
    # Unfinished: 409. And a retry is a batch creation like any: the token's one active batch is taken.
    stack.assert_error(stack.http("POST", f"/v1/batches/{slow.id}/retry"), 409, code="batch_not_finished")
    files_before = {f.id for f in client.files.list()}
    stack.assert_error(
        stack.http("POST", f"/v1/batches/{flaky.id}/retry", headers=own_key), 429, code="active_batches_quota_exceeded"
    )
    assert {f.id for f in client.files.list()} == files_before, "a refused retry left its input file behind"

    wait_until(
        lambda: client.batches.retrieve(slow.id).request_counts.completed >= 2,
        timeout=60,
        message="a few slow lines to finish",
        check=stack.check_alive,
    )
    client.batches.cancel(slow.id)
    cancelled = stack.wait_for_batch(slow.id, client=client, timeout=60)
    assert cancelled.status == "cancelled", cancelled
    errors = stack.read_file(cancelled.error_file_id, client=client)
    never_ran = {x["custom_id"] for x in errors if (x.get("error") or {}).get("code") == "batch_cancelled"}
    assert never_ran, errors

    res = stack.http("POST", f"/v1/batches/{slow.id}/retry", headers={"x-sluice-priority": "high"})
    assert res.status == 200, res.body
    again = res.json()
    assert again["metadata"] == {"sluice_retry_of": slow.id, "sluice_priority": "high"}, again
    sent = stack.read_file(again["input_file_id"], client=client)
    assert {x["custom_id"] for x in sent} == never_ran
    client.batches.cancel(again["id"])
    stack.wait_for_batch(again["id"], client=client, timeout=60)

    # A BYOK batch's retry needs the key again: it never falls back to the server's own key.
    stack.assert_error(stack.http("POST", f"/v1/batches/{flaky.id}/retry"), 400, param="x-sluice-provider-key")
    stack.mock_reset()
    res = stack.http("POST", f"/v1/batches/{flaky.id}/retry", headers=own_key)
    assert res.status == 200, res.body
    done = stack.wait_for_batch(res.json()["id"], client=client, timeout=60)
    assert done.request_counts.total == 2, done
    assert stack.mock_stats()["authorization"] == [f"Bearer sk-client-{run}"]
