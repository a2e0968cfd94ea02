"""Chaos: SIGKILL random Sluice processes and restart Redis while a batch runs.

Whatever dies, the batch must end in a terminal state with every custom_id exactly once across
the output and error files, counts equal to the files, and no per-batch Redis key left without
an expiry. ``SLUICE_CHAOS_SEED`` replays one schedule; ``SLUICE_CHAOS_LINES`` resizes the batch.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import uuid
from collections import Counter

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(240)]

LINES = int(os.environ.get("SLUICE_CHAOS_LINES", "5000"))
KILLS = 6
ROLES = ("web", "worker", "worker", "finalizer")
# Keys that index many objects and so never expire; everything else must, once the batch ended.
# (the id counter, the owners' keys and the index of every owner the usage audit walks).
GLOBAL_KEYS = ("sluice:seq", "sluice:owner:", "sluice:{owners}:all")
# ... and so do each shard's indexes of batches and files (``sluice:{<tag>}:batches:live``, ...).
SHARD_INDEXES = re.compile(r"sluice:\{[^}]+\}:(batches:|files:expiry$|webhooks:due$)")
# Each lease's fencing counter lives on beside it (a shard's, a chore's): never reset, never expiring.
LEASE_COUNTER = ":seq:leases"
# The cluster counters (a shard's metrics hashes) never expire either.
COUNTERS = ":metrics:"
# What a line may legitimately end with in the error file under kills (transient faults retry).
ACCEPTED_ERROR_CODES = {"poison_line"}


def _progress(client, batch_id: str) -> int | None:
    """Lines with a result so far, or None while the web process is down."""
    try:
        counts = client.batches.retrieve(batch_id).request_counts
    except (openai.APIConnectionError, openai.InternalServerError):
        return None
    return counts.completed + counts.failed


def test_batch_survives_kills_and_a_redis_restart(stack_factory, wait_until):
    seed = int(os.environ.get("SLUICE_CHAOS_SEED", str(int(time.time() * 1000) % 1_000_000)))
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    stack = stack_factory.start(
        name="chaos",
        workers=2,
        worker_concurrency=16,
        mock_latency_ms=30,
        redis_aof=True,
        # A small window: the web process is killed while it feeds, not only while it validates.
        env={
            "SLUICE_LEASE_S": "2",
            "SLUICE_MAX_ATTEMPTS": "8",
            "SLUICE_SHUTDOWN_GRACE_S": "2",
            "SLUICE_WINDOW_LINES": "300",
        },
    )
    client = stack.client(timeout=10)
    run = uuid.uuid4().hex[:8]
    messages = {f"chaos-{run}-{i:05d}": f"line {i} of {run}" for i in range(LINES)}
    # Transient faults: some lines fail with a 500 twice, a few with a 429 once (each 429 pauses
    # the provider for every worker, so they are kept few), then succeed.
    faults = {cid: {"mock_status": 500, "mock_fail_times": 2} for cid in rng.sample(sorted(messages), LINES // 30)}
    faults.update({cid: {"mock_status": 429, "mock_fail_times": 1} for cid in rng.sample(sorted(messages), 4)})
    rows = [stack.chat_line(cid, msg, **faults.get(cid, {})) for cid, msg in messages.items()]
    _, batch = stack.submit(rows, client=client)

    # The first victim is the web process while it validates and feeds the lines.
    stack.kill_and_replace("web")
    schedule = sorted(rng.uniform(0.05, 0.85) for _ in range(KILLS))
    redis_at = rng.randrange(KILLS)
    for i, fraction in enumerate(schedule):
        target = int(fraction * LINES)
        wait_until(
            lambda target=target: (_progress(client, batch.id) or 0) >= target,
            timeout=90,
            message=f"batch {batch.id} to reach {target} results (seed {seed})",
            check=stack.check_alive,
        )
        if i == redis_at:
            stack.redis.restart(sig=signal.SIGKILL)
        stack.kill_and_replace(rng.choice(ROLES))

    done = wait_until(
        lambda: (
            (b := client.batches.retrieve(batch.id)).status in ("completed", "failed", "cancelled", "expired") and b
        ),
        timeout=120,
        ignore=(openai.APIConnectionError, openai.InternalServerError),
        message=f"batch {batch.id} to finish (seed {seed})",
        check=stack.check_alive,
    )
    assert done.status == "completed", f"seed {seed}: {done}"

    output, errors = stack.results(done, client=client)
    seen = Counter(line["custom_id"] for line in output + errors)
    assert set(seen) == set(messages), (
        f"seed {seed}: missing {len(set(messages) - set(seen))}, extra {set(seen) - set(messages)}"
    )
    twice = {cid: n for cid, n in seen.items() if n != 1}
    assert not twice, f"seed {seed}: lines recorded more than once: {list(twice.items())[:5]}"
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    for line in errors:
        assert line["response"] is None and line["error"]["code"] in ACCEPTED_ERROR_CODES, line
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (LINES, len(output), len(errors)), (
        f"seed {seed}: {counts}"
    )

    r = stack.redis.client()
    try:
        leftovers = [
            k.decode()
            for k in r.scan_iter("sluice:*")
            if r.ttl(k) == -1
            and not k.decode().startswith(GLOBAL_KEYS)
            and not SHARD_INDEXES.match(k.decode())
            and not k.decode().endswith(LEASE_COUNTER)
            and COUNTERS not in k.decode()
        ]
        assert leftovers == [], f"seed {seed}: keys without expiry: {leftovers}"
        assert not [k for k in r.scan_iter(f"*{batch.id}*") if r.ttl(k) == -1], f"seed {seed}"
    finally:
        r.close()
