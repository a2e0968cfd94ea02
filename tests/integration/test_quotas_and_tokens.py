"""Per-token quotas (``[quotas]`` in ``SLUICE_CONFIG``) and run-time tokens (``sluice tokens``).

Every quota refusal is a 429 with ``type: "insufficient_quota"``, a code naming the quota and
``x-should-retry: false``; nothing already accepted is touched, and the quota frees up again when
batches end (or files are deleted). Each test uses its own token of the shared stack, so their
usage counters never mix.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MAX_ACTIVE = 2
MAX_STORED = 60_000
MAX_LINES = 10
QUOTAS_TOML = f"""
[quotas]
max_active_batches = {MAX_ACTIVE}
max_stored_bytes = {MAX_STORED}
max_enqueued_lines = {MAX_LINES}
"""
TOKENS = ("quota-tok-a", "quota-tok-b", "quota-tok-c", "quota-tok-d")
# A revocation takes effect within the token cache's lifetime (service/core/tokens.py, 5 s); the
# wait for it is a failure deadline ten times that.
REVOCATION_BOUND_S = 60.0


@pytest.fixture(scope="module")
def qstack(module_stack_factory):
    # Batches that must stay active while the test checks a quota hold their lines at the mock's
    # gate until the test releases them.
    return module_stack_factory.start(
        name="quotas",
        workers=2,
        worker_concurrency=32,
        tokens=TOKENS,
        config_toml=QUOTAS_TOML,
        mock={"gates": True},
    )


def _assert_quota_error(stack, exc: openai.APIStatusError, code: str) -> None:
    err = stack.assert_error(exc, 429, code=code)
    assert err["type"] == "insufficient_quota", err
    assert exc.response.headers.get("x-should-retry") == "false", dict(exc.response.headers)


def _rows(stack, tag: str, n: int, **extra) -> list[dict]:
    return [stack.chat_line(f"{tag}-{i:03d}", f"{tag} {i}", **extra) for i in range(n)]


def _assert_complete(stack, batch, client, rows) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(rows) and batch.request_counts.failed == 0, batch.request_counts
    out = stack.read_file(batch.output_file_id, client=client)
    assert sorted(line["custom_id"] for line in out) == sorted(r["custom_id"] for r in rows)


# --------------------------------------------------------------------------------------------
# 6. Quotas


def test_active_batches_quota(qstack):
    stack = qstack
    client = stack.client(token=TOKENS[0])
    run = uuid.uuid4().hex[:8]
    gate = f"ab-{run}"
    rows1 = _rows(stack, f"ab1-{run}", 1, mock_hold=gate)
    rows2 = _rows(stack, f"ab2-{run}", 1, mock_hold=gate)
    rows3 = _rows(stack, f"ab3-{run}", 2)
    _, b1 = stack.submit(rows1, client=client)
    _, b2 = stack.submit(rows2, client=client)
    f3 = stack.upload_jsonl(rows3, client=client)

    with pytest.raises(openai.RateLimitError) as e:
        stack.create_batch(f3.id, client=client)
    _assert_quota_error(stack, e.value, "active_batches_quota_exceeded")
    # The refusal really came while both were unfinished, and it created nothing.
    for b in (b1, b2):
        assert client.batches.retrieve(b.id).status not in ("completed", "failed", "expired", "cancelled")
    assert sorted(b.id for b in client.batches.list().data) == sorted([b1.id, b2.id])

    # Another token is not held back by this token's quota.
    other = stack.client(token=TOKENS[3])
    other_rows = _rows(stack, f"ab-other-{run}", 2)
    _, ob = stack.submit(other_rows, client=other)
    _assert_complete(stack, stack.wait_for_batch(ob.id, client=other, timeout=60), other, other_rows)

    # Nothing accepted was lost, and once they end the quota is free again.
    stack.mock().release(gate)
    _assert_complete(stack, stack.wait_for_batch(b1.id, client=client, timeout=60), client, rows1)
    _assert_complete(stack, stack.wait_for_batch(b2.id, client=client, timeout=60), client, rows2)
    b3 = stack.create_batch(f3.id, client=client)
    _assert_complete(stack, stack.wait_for_batch(b3.id, client=client, timeout=60), client, rows3)


def test_stored_bytes_quota(qstack):
    stack = qstack
    client = stack.client(token=TOKENS[2])
    run = uuid.uuid4().hex[:8]

    def jsonl_of_size(tag: str, size: int) -> bytes:
        line = stack.to_jsonl([stack.chat_line(tag, "")])
        pad = size - len(line)
        data = stack.to_jsonl([stack.chat_line(tag, "x" * pad)])
        assert len(data) == size
        return data

    big1 = stack.upload_jsonl(jsonl_of_size(f"big1-{run}", 35_000), client=client)
    before = sorted(f.id for f in client.files.list())
    with pytest.raises(openai.RateLimitError) as e:
        stack.upload_jsonl(jsonl_of_size(f"big2-{run}", 35_000), client=client)
    _assert_quota_error(stack, e.value, "storage_quota_exceeded")
    assert sorted(f.id for f in client.files.list()) == before, "a refused upload changed the file list"
    assert client.files.content(big1.id).content == jsonl_of_size(f"big1-{run}", 35_000)

    # The refused upload reserved nothing: what is left (25,000 bytes) can still be used.
    small = stack.upload_jsonl(jsonl_of_size(f"small-{run}", 20_000), client=client)
    with pytest.raises(openai.RateLimitError) as e:
        stack.upload_jsonl(jsonl_of_size(f"small2-{run}", 6_000), client=client)
    _assert_quota_error(stack, e.value, "storage_quota_exceeded")

    # Deleting a file gives its bytes back.
    client.files.delete(big1.id)
    big2 = stack.upload_jsonl(jsonl_of_size(f"big2-{run}", 35_000), client=client)
    assert sorted(f.id for f in client.files.list()) == sorted([small.id, big2.id])


def test_enqueued_lines_quota(qstack):
    stack = qstack
    client = stack.client(token=TOKENS[1])
    run = uuid.uuid4().hex[:8]

    # A batch larger than the whole allowance is refused even with nothing running.
    f11 = stack.upload_jsonl(_rows(stack, f"el11-{run}", MAX_LINES + 1), client=client)
    with pytest.raises(openai.RateLimitError) as e:
        stack.create_batch(f11.id, client=client)
    _assert_quota_error(stack, e.value, "enqueued_lines_quota_exceeded")

    gate = f"el-{run}"
    rows6 = _rows(stack, f"el6-{run}", 6, mock_hold=gate)
    rows5 = _rows(stack, f"el5-{run}", 5)
    rows4 = _rows(stack, f"el4-{run}", 4, mock_hold=gate)
    _, b6 = stack.submit(rows6, client=client)
    f5 = stack.upload_jsonl(rows5, client=client)
    with pytest.raises(openai.RateLimitError) as e:
        stack.create_batch(f5.id, client=client)  # 6 + 5 > 10
    _assert_quota_error(stack, e.value, "enqueued_lines_quota_exceeded")
    # Exactly the remaining allowance still fits (and the refusal above reserved no batch slot).
    _, b4 = stack.submit(rows4, client=client)  # 6 + 4 == 10
    assert client.batches.retrieve(b6.id).status not in ("completed", "failed", "expired", "cancelled")
    assert sorted(b.id for b in client.batches.list().data) == sorted([b6.id, b4.id])

    stack.mock().release(gate)
    _assert_complete(stack, stack.wait_for_batch(b6.id, client=client, timeout=60), client, rows6)
    _assert_complete(stack, stack.wait_for_batch(b4.id, client=client, timeout=60), client, rows4)
    b5 = stack.create_batch(f5.id, client=client)
    _assert_complete(stack, stack.wait_for_batch(b5.id, client=client, timeout=60), client, rows5)


# --------------------------------------------------------------------------------------------
# 7. sluice tokens create / list / revoke


@pytest.mark.single_redis
def test_tokens_cli(qstack, wait_until):
    stack = qstack
    name = f"team-{uuid.uuid4().hex[:6]}"
    created = stack.sluice(
        "tokens",
        "create",
        "--name",
        name,
        "--max-active-batches",
        "1",
        "--max-stored-bytes",
        "100000",
        "--max-enqueued-lines",
        "100",
        check=True,
    )
    token = created.stdout.splitlines()[0].strip()
    assert token and " " not in token, created.stdout
    digest = hashlib.sha256(token.encode()).hexdigest()
    plain_name = f"plain-{uuid.uuid4().hex[:6]}"
    plain_token = stack.sluice("tokens", "create", "--name", plain_name, check=True).stdout.splitlines()[0].strip()

    again = stack.sluice("tokens", "create", "--name", name)
    assert again.returncode != 0, "a second token with the same name was created"
    assert again.stdout.strip() == "", again.stdout

    # Works at once, beside the static tokens, and sees only its own objects.
    client = stack.client(token=token)
    assert client.files.list().data == []
    static = stack.client(token=TOKENS[3])
    static.files.list()
    stack.upload_jsonl(_rows(stack, "static", 1), client=static)
    assert client.files.list().data == []
    assert stack.client(token=plain_token).batches.list().data == []

    # Its own quotas apply: 20 lines (the default allows 10), but only one active batch (default 2).
    run = uuid.uuid4().hex[:8]
    gate = f"tk-{run}"
    rows = _rows(stack, f"tk-{run}", 20, mock_hold=gate)
    _, b1 = stack.submit(rows, client=client)
    f2 = stack.upload_jsonl(_rows(stack, f"tk2-{run}", 1), client=client)
    with pytest.raises(openai.RateLimitError) as e:
        stack.create_batch(f2.id, client=client)
    _assert_quota_error(stack, e.value, "active_batches_quota_exceeded")
    stack.mock().release(gate)
    _assert_complete(stack, stack.wait_for_batch(b1.id, client=client, timeout=60), client, rows)
    # A token without quotas of its own gets the configured defaults.
    plain = stack.client(token=plain_token)
    f_plain = stack.upload_jsonl(_rows(stack, f"pl-{run}", MAX_LINES + 1), client=plain)
    with pytest.raises(openai.RateLimitError) as e:
        stack.create_batch(f_plain.id, client=plain)
    _assert_quota_error(stack, e.value, "enqueued_lines_quota_exceeded")

    listed = stack.sluice("tokens", "list", check=True)
    assert name in listed.stdout and plain_name in listed.stdout, listed.stdout
    as_json = stack.sluice("tokens", "list", "--json", check=True)
    entries = {e["name"]: e for e in json.loads(as_json.stdout)}
    assert {name, plain_name} <= set(entries), entries
    mine = entries[name]
    for field in ("name", "id", "created_at", "max_active_batches", "max_stored_bytes", "max_enqueued_lines"):
        assert field in mine, (field, mine)
    assert (mine["max_active_batches"], mine["max_stored_bytes"], mine["max_enqueued_lines"]) == (1, 100000, 100)
    p = entries[plain_name]
    assert (p["max_active_batches"], p["max_stored_bytes"], p["max_enqueued_lines"]) == (
        MAX_ACTIVE,
        MAX_STORED,
        MAX_LINES,
    ), p
    for out in (listed, as_json):
        assert token not in out.stdout + out.stderr and plain_token not in out.stdout + out.stderr

    # Stored only as its digest.
    assert stack.redis.find(token) == [], "Redis holds the plaintext token"
    assert stack.redis.find(digest), "the token's SHA-256 digest is nowhere in Redis"

    revoked = stack.sluice("tokens", "revoke", name, check=True)
    assert token not in revoked.stdout + revoked.stderr
    wait_until(
        lambda: stack.http("GET", "/v1/files", token=token).status == 401,
        timeout=REVOCATION_BOUND_S,
        interval=0.2,
        message=f"the revoked token {name!r} to be refused with 401",
        check=stack.check_alive,
    )
    stack.assert_error(stack.http("GET", "/v1/batches", token=token), 401, code="invalid_api_key")
    assert stack.http("GET", "/v1/files", token=plain_token).status == 200, "revoking one token revoked another"
    assert stack.http("GET", "/v1/files", token=TOKENS[3]).status == 200
    assert name not in stack.sluice("tokens", "list", check=True).stdout
    assert stack.sluice("tokens", "revoke", name).returncode != 0, "revoking an unknown name succeeded"
    assert stack.sluice("tokens", "revoke", plain_name).returncode == 0

    for secret in (token, plain_token):
        assert stack.logs_containing(secret) == [], "a managed token appears in a process log"
