"""Quotas stay exact when Redis replies are lost after their command ran, and the audit repairs drift.

Every Sluice process of the stack talks to Redis through a :class:`LostReplyProxy` that loses about
5% of the replies: Redis runs the command, the connection is cut instead of delivering the answer,
and redis-py sends the command again. After a churn of uploads, batch creations, cancels and deletes
for one token with quotas, the proxy is healed and the token's usage counters must be exactly what
its files and batches account for: it stores exactly floor(quota / size) files of one size and runs
exactly its active-batch quota. Every line goes through the provider limiter's script (one provider
with a concurrency cap its mock enforces, one with a rate only). The usage audit is kept out of the
way (its sweep runs once at start, then not for an hour, and no repair may be logged), so nothing is
repaired after the fact. A second test plants drift by hand and waits for the finalizer's audit.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import openai
import pytest

from service.core import keys
from tests.support.lost_reply import LostReplyProxy

pytestmark = [pytest.mark.integration, pytest.mark.single_redis, pytest.mark.timeout(600)]

TOKEN = "lost-reply-tok"
SIZE = 2000  # bytes of every input file
MAX_FILES = 5
MAX_STORED = MAX_FILES * SIZE + SIZE // 2  # room for 5 files of SIZE, not 6
MAX_ACTIVE = 3
ROUNDS = 40
DROP_RATE = 0.05
CAP = 2  # the "capped" provider's concurrency limit, which its mock enforces with 429s
RATED_MODEL = "rated-model"
CONFIG_TOML = f"""
[quotas]
max_active_batches = {MAX_ACTIVE}
max_stored_bytes = {MAX_STORED}
max_enqueued_lines = 1000000

# Every admission goes through the limiter script: leases and rate tokens (capped), rate tokens only (rated).
[providers.rated]
base_url = "${{mock_url}}"
api_key_env = "LOST_REPLY_PROVIDER_KEY"
models = ["{RATED_MODEL}"]
rpm = 6000

[providers.capped]
base_url = "${{mock_url}}"
api_key_env = "LOST_REPLY_PROVIDER_KEY"
models = ["*"]
max_concurrency = {CAP}
rpm = 6000
"""
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture
def proxies():
    made: list[LostReplyProxy] = []
    yield made
    for p in made:
        p.close()


def _sized(stack, tag: str, lines: int, size: int, **extra) -> bytes:
    """``lines`` request lines, padded in the last one to exactly ``size`` bytes."""
    rows = [stack.chat_line(f"{tag}-{i}", f"{tag} {i}", **extra) for i in range(lines)]
    pad = size - len(stack.to_jsonl(rows))
    assert pad >= 0, f"{lines} lines do not fit in {size} bytes"
    rows[-1] = stack.chat_line(f"{tag}-{lines - 1}", f"{tag} {lines - 1}" + "x" * pad, **extra)
    data = stack.to_jsonl(rows)
    assert len(data) == size
    return data


def _retrying(call, attempts: int = 5):
    """``call()``, again after a 503 (every retry of one Redis command lost its reply); no other error."""
    for attempt in range(attempts):
        try:
            return call()
        except openai.InternalServerError as e:
            if e.status_code != 503 or attempt == attempts - 1:
                raise
            time.sleep(0.2)


def _quota_code(exc: openai.RateLimitError) -> str:
    return exc.response.json()["error"]["code"]


def _usage(stack, owner: str) -> dict[str, int]:
    r = stack.redis.client()
    try:
        h = r.hgetall(keys.owner_usage(owner))
    finally:
        r.close()
    return {name: int(h.get(name.encode(), 0)) for name in ("active_batches", "enqueued_lines", "stored_bytes")}


def _all_released(stack, batch_ids: list[str]) -> list[tuple[str, str]]:
    """The batches (and their status) whose quota has not been given back yet: no ``released`` flag."""
    r = stack.redis.client()
    try:
        found = [(b, r.hmget(keys.batch(b), "released", "status")) for b in batch_ids]
    finally:
        r.close()
    return [(b, (status or b"").decode()) for b, (released, status) in found if released is None]


def _delete_all_files(stack, client) -> None:
    for f in _retrying(lambda: list(client.files.list())):
        try:
            _retrying(lambda f=f: client.files.delete(f.id))
        except openai.NotFoundError:
            pass


def test_quotas_exact_under_lost_replies(stack_factory, proxies, wait_until):
    def via_proxy(server) -> str:
        proxy = LostReplyProxy(server.port, drop_rate=DROP_RATE, seed=20240611).start()
        proxies.append(proxy)
        return proxy.url

    stack = stack_factory.start(
        name="lost-replies",
        workers=2,
        worker_concurrency=16,
        tokens=(TOKEN,),
        upstream=False,
        mock={"max_concurrency": CAP},
        config_toml=CONFIG_TOML,
        redis_via=via_proxy,
        # Short leases: a lost XREADGROUP reply leaves its lines pending until their lease ends.
        env={"SLUICE_LEASE_S": "2", "SLUICE_SWEEP_INTERVAL_S": "3600", "LOST_REPLY_PROVIDER_KEY": "k"},
    )
    proxy = proxies[0]
    owner = hashlib.sha256(TOKEN.encode()).hexdigest()[:32]
    client = stack.client(token=TOKEN)
    run = uuid.uuid4().hex[:6]
    batches: list[str] = []
    counts = {"uploads": 0, "refused_uploads": 0, "batches": 0, "refused_batches": 0, "cancels": 0, "deletes": 0}

    def unfinished() -> list[str]:
        return [b for b in batches if _retrying(lambda b=b: client.batches.retrieve(b)).status not in TERMINAL]

    def upload(data: bytes):
        try:
            f = _retrying(lambda: client.files.create(file=("in.jsonl", data), purpose="batch"))
            counts["uploads"] += 1
            return f
        except openai.RateLimitError as e:
            assert _quota_code(e) == "storage_quota_exceeded", e
            counts["refused_uploads"] += 1
            return None

    def delete(file_id: str) -> None:
        try:
            _retrying(lambda: client.files.delete(file_id))
            counts["deletes"] += 1
        except openai.NotFoundError:
            pass  # a retried delete whose first try went through

    def create(file_id: str):
        try:
            b = _retrying(
                lambda: client.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
            )
        except openai.RateLimitError as e:
            assert _quota_code(e) == "active_batches_quota_exceeded", e
            counts["refused_batches"] += 1
            return None
        batches.append(b.id)
        counts["batches"] += 1
        return b

    started = time.monotonic()
    for i in range(ROUNDS):
        model = RATED_MODEL if i % 2 else "gpt-4o-mini"
        f = upload(_sized(stack, f"c{run}-{i}", 2, SIZE, model=model))
        extra = upload(_sized(stack, f"x{run}-{i}", 1, SIZE // 4))
        if extra is not None:
            delete(extra.id)
        if f is None:
            _delete_all_files(stack, client)
            continue
        b = create(f.id)
        if b is None:
            # Wait for one of ours to end (bounded), then try once more: a refusal is churn too.
            wait_until(
                lambda: len(unfinished()) < MAX_ACTIVE,
                timeout=60,
                interval=0.2,
                message="one of the token's batches to end",
                check=stack.check_alive,
            )
            b = create(f.id)
        if b is not None and i % 3 == 0:
            try:
                _retrying(lambda b=b: client.batches.cancel(b.id))
                counts["cancels"] += 1
            except openai.ConflictError:
                pass  # it ended first
        delete(f.id)
        for out in _retrying(lambda: list(client.files.list(purpose="batch_output"))):
            delete(out.id)
    churn_s = time.monotonic() - started
    dropped, replies = proxy.dropped, proxy.replies

    proxy.heal()
    wait_until(
        lambda: not unfinished(),
        timeout=120,
        interval=0.2,
        message=lambda: f"every batch to end: {[(b, client.batches.retrieve(b).status) for b in unfinished()]}",
        check=stack.check_alive,
    )
    try:
        wait_until(
            lambda: not _all_released(stack, batches),
            timeout=60,
            interval=0.1,
            message="every ended batch to give its quota back",
            check=stack.check_alive,
        )
    except AssertionError:  # WaitTimeout: measured and reported below
        pass
    unreleased = _all_released(stack, batches)

    files = _retrying(lambda: list(client.files.list()))
    after_churn = _usage(stack, owner)
    expected = {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": sum(f.bytes for f in files)}
    churn_error = {k: after_churn[k] - expected[k] for k in expected}
    _delete_all_files(stack, client)
    emptied = _usage(stack, owner)
    print(
        f"\n[lost-replies] rounds={ROUNDS} churn_s={churn_s:.1f} {counts} dropped_replies={dropped} "
        f"of {replies} replies ({dropped / max(1, replies):.1%}); counters after churn {after_churn}, "
        f"expected {expected}, error {churn_error}; after deleting every file {emptied}; "
        f"ended batches that never gave their quota back: {unreleased}"
    )
    assert dropped >= 20, f"the proxy dropped only {dropped} of {replies} replies: the test proved nothing"
    assert counts["batches"] >= 10 and counts["deletes"] >= 20, counts
    assert unreleased == [], "ended batches kept their quota"
    assert churn_error == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}, (after_churn, expected)
    mock = stack.mock_stats()
    assert mock["rejected_429"] == 0 and mock["max_in_flight"] <= CAP, mock
    assert emptied == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}, emptied

    # The quotas hold to the unit: exactly MAX_FILES files of SIZE bytes, exactly MAX_ACTIVE batches.
    slow = {"mock_latency_ms": 120_000}  # keeps the final batches unfinished while we look
    kept = []
    for i in range(MAX_FILES):
        kept.append(
            client.files.create(file=("q.jsonl", _sized(stack, f"q{run}-{i}", 1, SIZE, **slow)), purpose="batch")
        )
    with pytest.raises(openai.RateLimitError) as e:
        client.files.create(file=("q.jsonl", _sized(stack, f"q{run}-over", 1, SIZE, **slow)), purpose="batch")
    assert _quota_code(e.value) == "storage_quota_exceeded"
    for f in kept[:MAX_ACTIVE]:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as e:
        client.batches.create(
            input_file_id=kept[MAX_ACTIVE].id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert _quota_code(e.value) == "active_batches_quota_exceeded"
    assert stack.logs_containing("usage_repaired") == [], "the audit repaired counters: they had drifted"


def test_audit_repairs_planted_drift(stack_factory, wait_until):
    """Counters knocked off by hand are put right by the finalizer's periodic audit, which logs it."""
    stack = stack_factory.start(
        name="usage-audit",
        workers=1,
        worker_concurrency=8,
        tokens=(TOKEN,),
        config_toml=CONFIG_TOML,
        upstream=False,
        env={"SLUICE_SWEEP_INTERVAL_S": "0.5", "LOST_REPLY_PROVIDER_KEY": "k"},
    )
    owner = hashlib.sha256(TOKEN.encode()).hexdigest()[:32]
    client = stack.client(token=TOKEN)
    run = uuid.uuid4().hex[:6]
    kept = client.files.create(file=("a.jsonl", _sized(stack, f"a{run}", 2, SIZE)), purpose="batch")
    done = client.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = stack.wait_for_batch(done.id, client=client, timeout=60)
    assert done.status == "completed", done
    stored = sum(f.bytes for f in client.files.list())  # the input and the output file
    exact = {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": stored}
    wait_until(lambda: _usage(stack, owner) == exact, timeout=30, message="the batch to give its quota back")

    # Drift as a lost reply re-run by the old scripts left it: a leaked batch slot, lines, bytes.
    r = stack.redis.client()
    try:
        r.hincrby(keys.owner_usage(owner), "active_batches", MAX_ACTIVE)
        r.hincrby(keys.owner_usage(owner), "enqueued_lines", 7)
        r.hincrby(keys.owner_usage(owner), "stored_bytes", -50_000)
    finally:
        r.close()
    wait_until(
        lambda: _usage(stack, owner) == exact,
        timeout=30,
        interval=0.2,
        message=lambda: f"the audit to repair {_usage(stack, owner)} into {exact}",
        check=stack.check_alive,
    )
    assert stack.logs_containing('"usage_repaired"') == ["finalizer"]
    line = next(x for x in stack.process("finalizer").log_path.read_text().splitlines() if "usage_repaired" in x)
    assert f'"owner": "{owner}"' in line and '"before"' in line and '"after"' in line, line

    # The quotas hold to the unit again: the token can run its MAX_ACTIVE batches, and no more.
    _delete_all_files(stack, client)
    assert _usage(stack, owner) == {"active_batches": 0, "enqueued_lines": 0, "stored_bytes": 0}
    slow = {"mock_latency_ms": 120_000}
    files = [
        client.files.create(file=("q.jsonl", _sized(stack, f"q{run}-{i}", 1, SIZE, **slow)), purpose="batch")
        for i in range(MAX_ACTIVE + 1)
    ]
    for f in files[:MAX_ACTIVE]:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as e:
        client.batches.create(input_file_id=files[-1].id, endpoint="/v1/chat/completions", completion_window="24h")
    assert _quota_code(e.value) == "active_batches_quota_exceeded"
