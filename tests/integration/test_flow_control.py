"""Flow control and providers: global limits across workers, fairness between tokens, routing by
model over several providers, ``model_not_found``, and client-supplied provider keys (BYOK).

Every stack here is configured through ``SLUICE_CONFIG`` (TOML); the multi-provider ones leave
``SLUICE_UPSTREAM_URL`` unset, so there is no catch-all ``default`` provider.
"""

from __future__ import annotations

import time
import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ACTIVE = {"validating", "in_progress", "finalizing"}


# --------------------------------------------------------------------------------------------
# 1. Global limits: max_concurrency and rpm hold across three workers


LIMITED_TOML = """
[providers.limited]
base_url = "${mock_url}"
api_key_env = "LIMITED_PROVIDER_KEY"
models = ["*"]
max_concurrency = 8
rpm = 600
"""


def test_provider_limits_hold_across_workers(stack_factory):
    """3 workers x 64 slots against a provider allowing 8 in flight and 600 rpm (100 per 10 s window).

    Sluice must stay inside both limits without collecting a single 429 (its buckets start empty
    and run at 95% of the rate), while still using at least 90% of the allowed rate.
    """
    stack = stack_factory.start(
        name="limits",
        workers=3,
        worker_concurrency=64,
        mock={"latency_ms": 50, "max_concurrency": 8, "rpm": 600, "window_s": 10},
        upstream=False,
        config_toml=LIMITED_TOML,
        env={"LIMITED_PROVIDER_KEY": "limited-key"},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    n = 200
    rows = [stack.chat_line(f"lim-{run}-{i:03d}", f"limited {i}") for i in range(n)]
    _, created = stack.submit(rows, client=client)

    # 200 lines at 9.5/s take ~21 s; a stalled limiter shows up as a timeout here.
    batch = stack.wait_for_batch(created.id, client=client, timeout=90)
    stats = stack.mock_stats()
    span = (stats["last_request_at"] or 0) - (stats["first_request_at"] or 0)
    allowed_per_s = 600 / 60
    rate = stats["accepted"] / span if span > 0 else float("inf")
    print(
        f"\n[limits] lines={n} accepted={stats['accepted']} requests={stats['requests']} "
        f"peak_in_flight={stats['max_in_flight']} (limit 8) rejected_429={stats['rejected_429']} "
        f"span={span:.2f}s rate={rate:.2f}/s = {rate / allowed_per_s:.3f} of the allowed {allowed_per_s:g}/s"
    )

    assert batch.status == "completed", batch
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0, batch.request_counts
    assert stats["max_in_flight"] <= 8, f"peak concurrency {stats['max_in_flight']} > 8 at the provider"
    assert stats["rejected_429"] == 0, (
        f"the provider answered {stats['rejected_429']} requests with 429: Sluice overran its limits "
        f"(by_status {stats['by_status']})"
    )
    assert stats["accepted"] == n, stats
    assert stats["authorization"] == ["Bearer limited-key"], stats["authorization"]
    # Sluice aims at 95% of the rate; a loaded machine's scheduling delays only slow it further, so
    # the floor is low enough to hold there, and still far above a stalled limiter's rate.
    assert rate >= 0.6 * allowed_per_s, f"achieved {rate:.2f} requests/s, below 60% of the allowed {allowed_per_s:g}/s"


CONCURRENCY_TOML = """
[providers.narrow]
base_url = "${mock_url}"
api_key_env = "NARROW_PROVIDER_KEY"
models = ["*"]
max_concurrency = 8
"""


def test_provider_concurrency_cap_holds_across_workers(stack_factory):
    """The same 3 x 64 worker slots against a slow provider allowing 8 in flight, no rpm limit.

    Here concurrency (not the rate) is what binds: the cap must hold across the workers and
    still be used.
    """
    stack = stack_factory.start(
        name="narrow",
        workers=3,
        worker_concurrency=64,
        mock={"latency_ms": 200, "max_concurrency": 8},
        upstream=False,
        config_toml=CONCURRENCY_TOML,
        env={"NARROW_PROVIDER_KEY": "narrow-key"},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    n = 200
    rows = [stack.chat_line(f"cc-{run}-{i:03d}", f"narrow {i}") for i in range(n)]
    _, created = stack.submit(rows, client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=90)
    stats = stack.mock_stats()
    span = (stats["last_request_at"] or 0) - (stats["first_request_at"] or 0)
    ideal = 8 / 0.2  # 8 slots of 200 ms each
    rate = stats["accepted"] / span if span > 0 else float("inf")
    print(
        f"\n[concurrency] lines={n} accepted={stats['accepted']} peak_in_flight={stats['max_in_flight']} (limit 8) "
        f"rejected_429={stats['rejected_429']} span={span:.2f}s rate={rate:.1f}/s = {rate / ideal:.3f} of {ideal:g}/s"
    )
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0, batch.request_counts
    assert stats["max_in_flight"] <= 8, f"peak concurrency {stats['max_in_flight']} > 8 at the provider"
    assert stats["rejected_429"] == 0, f"{stats['rejected_429']} requests were refused with 429: {stats['by_status']}"
    assert stats["accepted"] == n, stats
    assert stats["max_in_flight"] == 8, f"the cap of 8 was never used in full: peak {stats['max_in_flight']}"
    # A floor a loaded machine still clears (its scheduling only adds to each 200 ms request); how close
    # to the ideal Sluice gets on a quiet machine is the benchmark's business.
    assert rate >= 0.3 * ideal, f"{rate:.1f} requests/s: the concurrency cap is badly under-used (ideal {ideal:g}/s)"


# --------------------------------------------------------------------------------------------
# 2. Fairness between tokens


def test_one_small_batch_of_another_token_is_not_starved(stack_factory, wait_until):
    """Token A floods the workers with five 2,000-line batches; token B's 50 lines still finish fast."""
    stack = stack_factory.start(
        name="token-fairness", workers=2, worker_concurrency=16, mock={"latency_ms": 100, "record": True}
    )
    token_a, token_b = stack.tokens
    a = stack.client(token=token_a)
    b = stack.client(token=token_b)
    run = uuid.uuid4().hex[:8]

    a_batches = []
    for k in range(5):
        rows = [stack.chat_line(f"a{k}-{run}-{i:04d}", f"a{k} {i}") for i in range(2000)]
        a_batches.append(stack.submit(rows, client=a)[1])
    # A's lines fill every worker slot (2 x 16) before B shows up.
    wait_until(
        lambda: stack.mock_stats()["in_flight"] >= 16,
        timeout=30,
        message="token A's batches to fill the workers",
        check=stack.check_alive,
    )

    b_rows = [stack.chat_line(f"b-{run}-{i:02d}", f"b {i}") for i in range(50)]
    b_file = stack.upload_jsonl(b_rows, client=b)
    started = time.monotonic()
    b_created = stack.create_batch(b_file.id, client=b)
    b_done = stack.wait_for_batch(b_created.id, client=b, timeout=60, interval=0.05)
    elapsed = time.monotonic() - started
    a_now = [a.batches.retrieve(x.id) for x in a_batches]
    a_finished = sum(x.request_counts.completed + x.request_counts.failed for x in a_now)
    # B's share of what reached the provider while B's lines were being sent: round-robin over
    # tokens gives B about half; round-robin over batches alone would give it about a sixth.
    seen = stack.mock().requests()
    b_at = [r["at"] for r in seen if str(r["content"]).startswith("b ")]
    window = [r for r in seen if b_at and min(b_at) <= r["at"] <= max(b_at)]
    b_share = len(b_at) / len(window) if window else 0.0
    print(
        f"\n[fairness] token B's 50-line batch completed in {elapsed:.2f}s after creation; "
        f"B's share of upstream requests while it ran {b_share:.2f} ({len(b_at)}/{len(window)}); "
        f"token A then had {a_finished}/10000 lines done, statuses {[x.status for x in a_now]}"
    )

    assert b_done.status == "completed", b_done
    assert b_done.request_counts.completed == 50 and b_done.request_counts.failed == 0, b_done.request_counts
    # B finished while all of A's batches still ran (no wall-clock bound: B's share below says how fair).
    for x in a_now:
        assert x.status in ACTIVE, f"token A's batch {x.id} is {x.status}: B did not have to compete with it"
    assert a_finished < 10000, a_finished
    assert len(b_at) == 50, len(b_at)
    assert b_share >= 0.35, (
        f"B got {b_share:.0%} of the upstream requests while it ran: tokens do not share the workers fairly"
    )

    out = stack.read_file(b_done.output_file_id, client=b)
    expected = {r["custom_id"]: r["body"]["messages"][0]["content"] for r in b_rows}
    assert sorted(line["custom_id"] for line in out) == sorted(expected)
    for line in out:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + expected[line["custom_id"]]

    # Stop A's flood rather than wait for it; its results still add up.
    for x in a_batches:
        a.batches.cancel(x.id)
    for x in a_batches:
        done = stack.wait_for_batch(x.id, client=a, timeout=60)
        assert done.status in ("cancelled", "completed"), done
        out, err = stack.results(done, client=a)
        assert len(out) + len(err) == 2000 == done.request_counts.total


# --------------------------------------------------------------------------------------------
# 3./4. Routing by model over two providers; model_not_found


TWO_PROVIDERS_TOML = """
[providers.p1]
base_url = "${p1_url}"
api_key_env = "P1_API_KEY"
models = ["gpt-4o*"]

[providers.p2]
base_url = "${p2_url}"
api_key_env = "P2_API_KEY"
models = ["claude-*", "llama-3", "gpt-4o-special"]
"""
P1_KEY = "p1-configured-key"
P2_KEY = "p2-configured-key"
# model -> the provider that must serve it (gpt-4o-special: p2's exact name beats p1's pattern)
ROUTES = {
    "gpt-4o-mini": "p1",
    "gpt-4o": "p1",
    "claude-3-5-sonnet": "p2",
    "llama-3": "p2",
    "gpt-4o-special": "p2",
}


@pytest.fixture(scope="module")
def rstack(module_stack_factory):
    return module_stack_factory.start(
        name="routing",
        workers=2,
        worker_concurrency=8,
        extra_mocks={"p1": {"record": True}, "p2": {"record": True}},
        upstream=False,
        config_toml=TWO_PROVIDERS_TOML,
        env={"P1_API_KEY": P1_KEY, "P2_API_KEY": P2_KEY},
    )


def test_lines_go_to_the_provider_serving_their_model(rstack):
    stack = rstack
    stack.reset_mocks()
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = []
    for i in range(30):
        model = list(ROUTES)[i % len(ROUTES)]
        rows.append(stack.chat_line(f"rt-{run}-{i:02d}", f"route {run} {i} {model}", model=model))
    _, created = stack.submit(rows, client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 30 and batch.request_counts.failed == 0, batch.request_counts

    content_of = {r["custom_id"]: r["body"]["messages"][0]["content"] for r in rows}
    model_of = {r["custom_id"]: r["body"]["model"] for r in rows}
    out = stack.read_file(batch.output_file_id, client=client)
    assert sorted(line["custom_id"] for line in out) == sorted(content_of)
    for line in out:
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == "echo: " + content_of[line["custom_id"]], line
        assert body["model"] == model_of[line["custom_id"]], line

    for name, key in (("p1", P1_KEY), ("p2", P2_KEY)):
        expected = sorted(r["body"]["messages"][0]["content"] for r in rows if ROUTES[r["body"]["model"]] == name)
        seen = stack.mock(name).requests()
        assert sorted(req["content"] for req in seen) == expected, f"{name} got the wrong lines"
        assert all(ROUTES[req["model"]] == name for req in seen), seen
        stats = stack.mock(name).stats()
        assert stats["requests"] == len(expected), (name, stats)
        assert stats["authorization"] == [f"Bearer {key}"], (name, stats["authorization"])
    assert stack.mock().stats()["requests"] == 0, "a line reached the mock that no provider is configured for"


def test_provider_header_sends_the_whole_batch_to_that_provider(rstack):
    stack = rstack
    stack.reset_mocks()
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"hd-{run}-{i}", f"forced {run} {i}", model="gpt-4o-mini") for i in range(6)]
    f = stack.upload_jsonl(rows, client=client)
    created = stack.create_batch(f.id, client=client, extra_headers={"x-sluice-provider": "p2"})
    batch = stack.wait_for_batch(created.id, client=client, timeout=60)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 6, batch.request_counts
    assert sorted(req["content"] for req in stack.mock("p2").requests()) == sorted(
        r["body"]["messages"][0]["content"] for r in rows
    )
    assert stack.mock("p2").stats()["authorization"] == [f"Bearer {P2_KEY}"]
    assert stack.mock("p1").stats()["requests"] == 0, "gpt-4o-mini lines went to p1 despite x-sluice-provider: p2"


def test_model_no_provider_serves_fails_the_batch_and_sends_nothing(rstack):
    stack = rstack
    stack.reset_mocks()
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    rows = [
        stack.chat_line(f"nf-{run}-1", "fine", model="gpt-4o-mini"),
        stack.chat_line(f"nf-{run}-2", "nobody serves me", model="mistral-large"),
        stack.chat_line(f"nf-{run}-3", "fine too", model="claude-3-haiku"),
        stack.chat_line(f"nf-{run}-4", "not llama-3 exactly", model="llama-3.1"),
    ]
    _, created = stack.submit(rows, client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=30)
    assert batch.status == "failed", batch
    assert batch.errors is not None and batch.errors.data, batch
    errors = sorted((e.line, e.code, e.param) for e in batch.errors.data)
    assert errors == [(2, "model_not_found", "body.model"), (4, "model_not_found", "body.model")], errors
    assert all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None, batch
    for name in ("default", "p1", "p2"):
        assert stack.mock(name).stats()["requests"] == 0, f"mock {name} was sent a line of a failed batch"


# --------------------------------------------------------------------------------------------
# 5. BYOK: a client's own provider key, for its batch only


BYOK_SECRET = "server-secret-for-byok-tests-1f0c"


def _byok_field(stack, batch_id: str):
    from service.core import keys

    r = stack.redis.client()
    try:
        return r.hget(keys.batch(batch_id), "byok")
    finally:
        r.close()


@pytest.mark.single_redis
def test_byok_key_is_used_for_its_batch_only_and_never_kept(stack_factory, wait_until):
    stack = stack_factory.start(
        name="byok",
        workers=2,
        worker_concurrency=4,
        extra_mocks={"p1": {"record": True, "gates": True, "latency_ms": 60}, "p2": {"record": True}},
        upstream=False,
        config_toml=TWO_PROVIDERS_TOML,
        env={"P1_API_KEY": P1_KEY, "P2_API_KEY": P2_KEY, "SLUICE_SECRET_KEY": BYOK_SECRET, "SLUICE_LOG_LEVEL": "debug"},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    client_key = f"client-key-{uuid.uuid4().hex}"
    # One line waits at p1's gate: the BYOK batch is certainly still running when its key is looked for.
    hold = f"bk-{run}"
    byok_rows = [
        stack.chat_line(f"bk-{run}-{i:02d}", f"byok {run} {i}", **({"mock_hold": hold} if i == 0 else {}))
        for i in range(40)
    ]
    # One transient failure, so the retry path runs with the client's key too.
    byok_rows.append(stack.chat_line(f"bk-{run}-retry", f"byok {run} retry", mock_status=500, mock_fail_times=1))
    plain_rows = [stack.chat_line(f"pl-{run}-{i:02d}", f"plain {run} {i}") for i in range(40)]
    byok_file = stack.upload_jsonl(byok_rows, client=client)
    plain_file = stack.upload_jsonl(plain_rows, client=client)

    byok = stack.create_batch(
        byok_file.id, client=client, extra_headers={"x-sluice-provider": "p1", "x-sluice-provider-key": client_key}
    )
    plain = stack.create_batch(plain_file.id, client=client)

    # While it runs the key is kept encrypted, and only in the batch's hash.
    sealed = _byok_field(stack, byok.id)
    assert sealed, "the batch hash has no byok field while the batch runs"
    assert client_key.encode() not in sealed, "the byok field holds the key in plaintext"
    assert stack.redis.find(client_key) == [], "the client's key is stored in plaintext"
    stack.mock("p1").release(hold)

    byok_done = stack.wait_for_batch(byok.id, client=client, timeout=60)
    plain_done = stack.wait_for_batch(plain.id, client=client, timeout=60)
    assert byok_done.status == "completed", byok_done
    assert byok_done.request_counts.completed == 41 and byok_done.request_counts.failed == 0, byok_done.request_counts
    assert plain_done.status == "completed", plain_done
    assert plain_done.request_counts.completed == 40, plain_done.request_counts

    seen = stack.mock("p1").requests()
    byok_reqs = [r for r in seen if str(r["content"]).startswith(f"byok {run}")]
    plain_reqs = [r for r in seen if str(r["content"]).startswith(f"plain {run}")]
    assert len(byok_reqs) == 42 and len(plain_reqs) == 40, (len(byok_reqs), len(plain_reqs), len(seen))
    wrong_byok = [r for r in byok_reqs if r["authorization"] != f"Bearer {client_key}"]
    wrong_plain = [r for r in plain_reqs if r["authorization"] != f"Bearer {P1_KEY}"]
    assert not wrong_byok, f"{len(wrong_byok)} requests of the BYOK batch did not carry the client's key"
    assert not wrong_plain, f"{len(wrong_plain)} requests of the normal batch carried another key than p1's"
    # The two batches really ran at the same time, so the keys were kept apart per batch, not per moment.
    assert min(r["at"] for r in byok_reqs) < max(r["at"] for r in plain_reqs), "the batches did not overlap"
    assert min(r["at"] for r in plain_reqs) < max(r["at"] for r in byok_reqs), "the batches did not overlap"
    assert stack.mock("p2").stats()["requests"] == 0

    # A BYOK batch that fails validation and one that is cancelled lose their key as well.
    failing_key = f"client-key-failing-{uuid.uuid4().hex}"
    bad_file = stack.upload_jsonl([stack.chat_line(f"bad-{run}", "x"), {"custom_id": f"bad2-{run}"}], client=client)
    failing = stack.create_batch(
        bad_file.id, client=client, extra_headers={"x-sluice-provider": "p1", "x-sluice-provider-key": failing_key}
    )
    cancelled_key = f"client-key-cancelled-{uuid.uuid4().hex}"
    slow_gate = f"sl-{run}"
    slow_rows = [stack.chat_line(f"sl-{run}-{i:02d}", f"slow {run} {i}", mock_hold=slow_gate) for i in range(30)]
    slow_file = stack.upload_jsonl(slow_rows, client=client)
    slow = stack.create_batch(
        slow_file.id, client=client, extra_headers={"x-sluice-provider": "p1", "x-sluice-provider-key": cancelled_key}
    )
    assert stack.wait_for_batch(failing.id, client=client, timeout=30).status == "failed"
    stack.wait_for_batch(slow.id, client=client, statuses={"in_progress"}, timeout=30)
    wait_until(
        lambda: any(r["authorization"] == f"Bearer {cancelled_key}" for r in stack.mock("p1").requests()),
        timeout=60,
        message="the slow BYOK batch to reach p1",
        check=stack.check_alive,
    )
    client.batches.cancel(slow.id)
    stack.mock("p1").release(slow_gate)
    assert stack.wait_for_batch(slow.id, client=client, timeout=60).status == "cancelled"

    # Ended: no trace of any client key (nor of a byok field) anywhere in Redis.
    for batch_id in (byok.id, failing.id, slow.id):
        assert _byok_field(stack, batch_id) is None, f"batch {batch_id} still has a byok field after it ended"
    for key in (client_key, failing_key, cancelled_key):
        assert stack.redis.find(key) == [], f"Redis still holds {key!r}"
    assert stack.redis.find(sealed) == [], "the sealed key outlived its batch"

    # ... and in no process log (stop the Sluice processes first, so every log is flushed).
    stack.runner.stop([p for p in stack.processes if p.name != "redis"])
    for key in (client_key, failing_key, cancelled_key):
        assert stack.logs_containing(key) == [], f"{key!r} appears in a process log"
    assert stack.logs_containing(P1_KEY) == [], "the configured provider key appears in a process log"


@pytest.mark.single_redis
def test_byok_and_provider_header_errors(stack_factory):
    stack = stack_factory.start(
        name="byok-errors",
        workers=0,
        finalizer=False,
        extra_mocks={"p1": {}, "p2": {}},
        upstream=False,
        config_toml=TWO_PROVIDERS_TOML,
        env={"P1_API_KEY": P1_KEY, "P2_API_KEY": P2_KEY},  # no SLUICE_SECRET_KEY
    )
    client = stack.client()
    f = stack.upload_jsonl([stack.chat_line("e-1", "hi")], client=client)
    key = f"client-key-{uuid.uuid4().hex}"

    with pytest.raises(openai.BadRequestError) as e:
        stack.create_batch(f.id, client=client, extra_headers={"x-sluice-provider": "p1", "x-sluice-provider-key": key})
    stack.assert_error(e.value, 400)
    assert key not in e.value.response.text

    with pytest.raises(openai.BadRequestError) as e:
        stack.create_batch(f.id, client=client, extra_headers={"x-sluice-provider": "nope"})
    stack.assert_error(e.value, 400, param="x-sluice-provider")

    with pytest.raises(openai.BadRequestError) as e:
        stack.create_batch(f.id, client=client, extra_headers={"x-sluice-provider-key": key})
    stack.assert_error(e.value, 400)
    assert key not in e.value.response.text

    assert client.batches.list().data == [], "a rejected create left a batch behind"
    assert stack.redis.find(key) == []
    assert stack.logs_containing(key) == []
