"""Delegating batches to a provider's own Batch API (workers/delegate.py), with real processes.

One stack, two providers on the same recording mock: ``exec`` (models ``exec-*``) runs lines one by
one against the real-time endpoint, ``batchy`` (every other model) delegates them to the mock's
Files and Batches API, at most ``PART_LINES`` lines per provider batch. The finalizer, the process
that runs delegation, is SIGKILLed at the points that matter and replaced.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from typing import Any

import pytest

from service.core import keys
from tests.conftest import http_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PART_LINES = 25
CONFIG = f"""
[providers.exec]
base_url = "${{mock_url}}"
api_key_env = "EXEC_KEY"
models = ["exec-*"]

[providers.batchy]
base_url = "${{mock_url}}"
api_key_env = "BATCHY_KEY"
models = ["*"]
batch_api = "delegate"
batch_max_lines = {PART_LINES}
batch_poll_s = 0.2
batch_poll_max_s = 0.5
"""
BATCHY_KEY = "batchy-provider-key"


@pytest.fixture(scope="module")
def dstack(module_stack_factory):
    return module_stack_factory.start(
        name="delegate",
        workers=1,
        upstream=False,
        config_toml=CONFIG,
        mock={"record": True},
        env={"EXEC_KEY": "exec-key", "BATCHY_KEY": BATCHY_KEY, "SLUICE_LEASE_S": "2"},
    )


def _rows(stack, run: str, n: int, *, model: str = "gpt-4o-mini", prefix: str = "d", **extra: Any) -> dict[str, dict]:
    return {
        f"{prefix}-{run}-{i:04d}": stack.chat_line(
            f"{prefix}-{run}-{i:04d}", f"line {i} of {run}", model=model, **extra
        )
        for i in range(n)
    }


def _provider_batches(stack, sluice_batch_id: str) -> list[dict]:
    """Every batch the mock holds for this Sluice batch (its list, paged), oldest first."""
    found, after = [], None
    while True:
        query = "?limit=100" + (f"&after={after}" if after else "")
        page = http_request("GET", f"{stack.mock_url}/v1/batches{query}").json()
        found += [b for b in page["data"] if (b.get("metadata") or {}).get("sluice_batch_id") == sluice_batch_id]
        if not page["has_more"]:
            return found[::-1]
        after = page["last_id"]


def _once(output: list[dict], errors: list[dict], custom_ids) -> None:
    seen = Counter(line["custom_id"] for line in output + errors)
    assert set(seen) == set(custom_ids), (set(custom_ids) - set(seen), set(seen) - set(custom_ids))
    assert set(seen.values()) == {1}, [c for c, n in seen.items() if n > 1][:5]


def _check_echo(output: list[dict], rows: dict[str, dict]) -> None:
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        sent = rows[line["custom_id"]]["body"]["messages"][-1]["content"]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + sent


def _log(stack) -> list[dict]:
    return stack.mock().requests()


def _kill_finalizer_and_replace(stack) -> None:
    victim = next(p for p in stack.processes if p.name.startswith("finalizer") and p.alive and not p.stopping)
    victim.stopping = True
    victim.signal(signal.SIGKILL)
    victim.popen.wait(timeout=10)
    stack.spawn("finalizer")


def test_a_delegated_batch_costs_one_upload_one_create_and_polls(dstack):
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 18)
    rows.update(_rows(dstack, run, 2, prefix="bad", mock_status=400))
    _, created = dstack.submit(list(rows.values()), client=client, metadata={"suite": "delegate"})
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.metadata == {"suite": "delegate"}
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert sorted(e["custom_id"] for e in errors) == sorted(c for c in rows if c.startswith("bad"))
    assert all(e["response"]["status_code"] == 400 for e in errors)
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (20, 18, 2)

    log = _log(dstack)  # before this test's own requests to the mock
    (pbatch,) = _provider_batches(dstack, batch.id)
    assert pbatch["metadata"]["sluice_part"] == "0" and pbatch["request_counts"]["total"] == 20
    assert pbatch["endpoint"] == "/v1/chat/completions" and pbatch["completion_window"] == "24h"
    calls = Counter((r["method"], r["path"].replace(pbatch["id"], "{batch}")) for r in log)
    print("provider-side requests of one delegated 20-line batch:", dict(calls))
    assert calls[("POST", "/v1/files")] == 1
    assert calls[("POST", "/v1/batches")] == 1
    assert calls[("GET", "/v1/batches/{batch}")] >= 1
    assert not [r for r in log if r["path"].endswith(("/chat/completions", "/embeddings", "/responses"))], (
        "a delegated line must not be sent to the real-time endpoint"
    )
    assert {r["authorization"] for r in log} == {f"Bearer {BATCHY_KEY}"}
    # Merged, then deleted at the provider: input, output and error files.
    assert calls[("DELETE", f"/v1/files/{pbatch['input_file_id']}")] == 1
    for file_id in (pbatch["input_file_id"], pbatch["output_file_id"], pbatch["error_file_id"]):
        assert http_request("GET", f"{dstack.mock_url}/v1/files/{file_id}").status == 404


def test_cancel_mid_run_cancels_the_provider_batch_and_keeps_partial_results(dstack, wait_until):
    client = dstack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 24, mock_latency_ms=250)
    _, created = dstack.submit(list(rows.values()), client=client)
    # The provider's progress shows in request_counts before anything was downloaded.
    wait_until(
        lambda: client.batches.retrieve(created.id).request_counts.completed >= 3,
        timeout=60,
        message="the provider's progress to show in request_counts",
        check=dstack.check_alive,
    )
    assert client.batches.cancel(created.id).status == "cancelling"
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "cancelled", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert 3 <= len(output) < 24, len(output)
    assert errors and all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errors)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
    (pbatch,) = _provider_batches(dstack, batch.id)
    assert pbatch["status"] == "cancelled"


def test_cancel_right_after_create_leaves_nothing_running_at_the_provider(dstack, wait_until):
    """Cancelled while validating, uploading or creating: whatever the timing, nothing is lost or left behind."""
    client = dstack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 10, mock_latency_ms=300)
    _, created = dstack.submit(list(rows.values()), client=client)
    client.batches.cancel(created.id)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "cancelled", batch
    output, errors = dstack.results(batch, client=client)
    assert batch.request_counts.total in (0, 10)
    if batch.request_counts.total:
        _once(output, errors, rows)
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert all(p["status"] in ("cancelled", "completed") for p in _provider_batches(dstack, batch.id))
    files = http_request("GET", f"{dstack.mock_url}/v1/files").json()["data"]
    assert not [f for f in files if batch.id in f["filename"]], "a copy of the input was left at the provider"


def test_provider_expiry_expires_the_batch(dstack):
    client = dstack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 10)
    cids = list(rows)
    rows[cids[6]]["body"]["mock_batch_expire"] = True
    _, created = dstack.submit(list(rows.values()), client=client)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "expired" and batch.expired_at, batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    assert sorted(line["custom_id"] for line in output) == cids[:6]
    assert sorted(e["custom_id"] for e in errors) == cids[6:]
    assert all(e["error"]["code"] == "batch_expired" for e in errors)


def test_a_failed_provider_batch_fails_each_of_its_lines(dstack):
    client = dstack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 6)
    next(iter(rows.values()))["body"]["mock_batch_fail"] = "Enqueued token limit reached for gpt-4o-mini"
    _, created = dstack.submit(list(rows.values()), client=client)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    assert output == []
    for e in errors:
        assert e["error"]["code"] == "provider_batch_failed", e
        assert "batchy" in e["error"]["message"] and "Enqueued token limit reached" in e["error"]["message"], e
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 6)


def test_a_big_batch_is_split_into_provider_batches(dstack, wait_until):
    client = dstack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 2 * PART_LINES + 10, mock_latency_ms=20)
    _, created = dstack.submit(list(rows.values()), client=client)
    shown: list[int] = []

    def finished():
        b = client.batches.retrieve(created.id)
        shown.append(b.request_counts.completed)
        return b if b.status in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_until(finished, timeout=90, message="the batch to finish", check=dstack.check_alive)
    assert batch.status == "completed", batch
    assert shown == sorted(shown), f"request_counts went back while the parts were downloaded: {shown}"
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert errors == []
    parts = _provider_batches(dstack, batch.id)
    assert sorted(p["metadata"]["sluice_part"] for p in parts) == ["0", "1", "2"], "one provider batch per part"
    assert sorted(p["request_counts"]["total"] for p in parts) == [10, PART_LINES, PART_LINES]
    assert all(p["status"] == "completed" for p in parts)


def test_a_mixed_batch_is_partly_delegated_and_partly_executed(dstack):
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    delegated = _rows(dstack, run, 12)
    executed = _rows(dstack, run, 12, model="exec-small", prefix="x")
    rows = {**delegated, **executed}
    order = [row for pair in zip(delegated.values(), executed.values()) for row in pair]  # interleaved
    _, created = dstack.submit(order, client=client)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert errors == [] and batch.request_counts.completed == 24
    (pbatch,) = _provider_batches(dstack, batch.id)
    assert pbatch["request_counts"]["total"] == 12
    realtime = [r for r in _log(dstack) if r["path"] == "/v1/chat/completions"]
    assert sorted(r["content"] for r in realtime) == sorted(
        r["body"]["messages"][-1]["content"] for r in executed.values()
    )
    assert {r["model"] for r in realtime} == {"exec-small"}


# ----------------------------------------------------------------------------- SIGKILL points
def test_finalizer_killed_mid_upload(dstack, wait_until):
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 8)
    next(iter(rows.values()))["body"]["mock_upload_delay_ms"] = 4000
    _, created = dstack.submit(list(rows.values()), client=client)
    wait_until(
        lambda: any(r["method"] == "POST" and r["path"] == "/v1/files" and r["status"] is None for r in _log(dstack)),
        timeout=60,
        message="the upload to be under way",
        check=dstack.check_alive,
    )
    _kill_finalizer_and_replace(dstack)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    assert len(output) == 8
    assert len(_provider_batches(dstack, batch.id)) == 1
    uploads = [r for r in _log(dstack) if r["method"] == "POST" and r["path"] == "/v1/files"]
    assert len(uploads) == 1, "the file the killed process uploaded was found and used, not uploaded again"


def test_finalizer_killed_after_create_before_recording_the_id(dstack, wait_until):
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 8)
    next(iter(rows.values()))["body"]["mock_create_delay_ms"] = 4000
    _, created = dstack.submit(list(rows.values()), client=client)
    wait_until(
        lambda: (
            _provider_batches(dstack, created.id)
            and any(r["method"] == "POST" and r["path"] == "/v1/batches" and r["status"] is None for r in _log(dstack))
        ),
        timeout=60,
        message="the provider batch to exist while its create is unanswered",
        check=dstack.check_alive,
    )
    _kill_finalizer_and_replace(dstack)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    assert len(output) == 8
    (pbatch,) = _provider_batches(dstack, batch.id)  # adopted from the list, not created twice
    assert pbatch["status"] == "completed"
    assert len([r for r in _log(dstack) if r["method"] == "POST" and r["path"] == "/v1/batches"]) == 1


@pytest.mark.single_redis
def test_finalizer_killed_mid_download(dstack, wait_until):
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    n = PART_LINES  # one provider batch, its output served in ten slow pieces
    rows = _rows(dstack, run, n)
    next(iter(rows.values()))["body"]["mock_content_delay_ms"] = 700
    _, created = dstack.submit(list(rows.values()), client=client)
    r = dstack.redis.client()
    try:
        done_key = keys.done(created.id)
        wait_until(
            lambda: 0 < r.bitcount(done_key) < n,
            timeout=60,
            interval=0.02,
            message="some results to be recorded while the download goes on",
            check=dstack.check_alive,
        )
    finally:
        r.close()
    _kill_finalizer_and_replace(dstack)
    batch = dstack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert (len(output), batch.request_counts.completed) == (n, n)
    (pbatch,) = _provider_batches(dstack, batch.id)
    downloads = [x for x in _log(dstack) if x["path"] == f"/v1/files/{pbatch['output_file_id']}/content"]
    assert len(downloads) >= 2, "the replacement downloaded the output again"


def test_finalizer_paused_past_its_lease_mid_create_writes_nothing_when_resumed(dstack, wait_until):
    """SIGSTOP while the create is unanswered; a peer adopts the provider batch; the resumed holder is fenced off."""
    client = dstack.client()
    dstack.reset_mocks()
    run = uuid.uuid4().hex[:8]
    rows = _rows(dstack, run, 8)
    next(iter(rows.values()))["body"]["mock_create_delay_ms"] = 3000
    _, created = dstack.submit(list(rows.values()), client=client)
    wait_until(
        lambda: _provider_batches(dstack, created.id),
        timeout=60,
        message="the provider batch to exist",
        check=dstack.check_alive,
    )
    victim = next(p for p in dstack.processes if p.name.startswith("finalizer") and p.alive and not p.stopping)
    victim.signal(signal.SIGSTOP)
    try:
        peer = dstack.spawn("finalizer")
        wait_until(
            lambda: peer.name in dstack.logs_containing("delegate_batch_adopted"),
            timeout=60,
            message="the peer to adopt the provider batch",
            check=dstack.check_alive,
        )
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(
        lambda: (
            victim.name in dstack.logs_containing("delegate_step_stale")
            or victim.name in dstack.logs_containing("delegate_lease_lost")
        ),
        timeout=60,
        message="the resumed holder to find itself fenced off",
        check=dstack.check_alive,
    )
    batch = dstack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    output, errors = dstack.results(batch, client=client)
    _once(output, errors, rows)
    assert len(output) == 8
    (pbatch,) = _provider_batches(dstack, batch.id)
    assert pbatch["status"] == "completed", "the resumed holder must not cancel the batch its peer adopted"


def test_sluice_expiry_cancels_the_provider_batch(stack_factory):
    stack = stack_factory.start(
        name="delegate-expiry",
        workers=1,
        upstream=False,
        config_toml=CONFIG,
        env={"EXEC_KEY": "e", "BATCHY_KEY": "b", "SLUICE_COMPLETION_WINDOW_S": "4"},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = _rows(stack, run, 20, mock_latency_ms=400)  # 8 s at the provider: Sluice's 4 s window ends first
    _, created = stack.submit(list(rows.values()), client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "expired", batch
    output, errors = stack.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert errors and all(e["error"]["code"] == "batch_expired" for e in errors)
    (pbatch,) = _provider_batches(stack, batch.id)
    assert pbatch["status"] == "cancelled"


# ----------------------------------------------------------------------------- Sluice as the provider
def test_a_sluice_stack_delegating_to_another_sluice_stack(stack_factory):
    provider = stack_factory.start(name="provider-sluice", workers=1)
    front = stack_factory.start(
        name="front-sluice",
        workers=1,
        upstream=False,
        config_toml=f"""
[providers.downstream]
base_url = "{provider.api_url}"
api_key_env = "DOWNSTREAM_TOKEN"
batch_api = "auto"
has_batch_api = true
batch_poll_s = 0.2
batch_poll_max_s = 0.5
""",
        env={"DOWNSTREAM_TOKEN": provider.token},
    )
    run = uuid.uuid4().hex[:8]
    rows = _rows(front, run, 15)
    rows.update(_rows(front, run, 3, prefix="bad", mock_status=404))
    client = front.client()
    _, created = front.submit(list(rows.values()), client=client)
    batch = front.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    output, errors = front.results(batch, client=client)
    _once(output, errors, rows)
    _check_echo(output, rows)
    assert sorted(e["custom_id"] for e in errors) == sorted(c for c in rows if c.startswith("bad"))
    assert (batch.request_counts.completed, batch.request_counts.failed) == (15, 3)

    downstream = provider.client()
    (theirs,) = [b for b in downstream.batches.list() if (b.metadata or {}).get("sluice_batch_id") == batch.id]
    assert theirs.status == "completed" and theirs.request_counts.total == 18
    assert front.mock_stats()["requests"] == 0, "the front stack executed nothing itself"
    assert provider.mock_stats()["requests"] == 18
    # Its copies were deleted once merged.
    left = {f.id for f in downstream.files.list()}
    assert not left & {theirs.input_file_id, theirs.output_file_id, theirs.error_file_id}
