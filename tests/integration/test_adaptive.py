"""Adaptive concurrency: Sluice finds a provider's concurrency limit by itself.

The mock answers 429, without ``Retry-After``, to any request beyond its hidden limit; Sluice is told
no limit and runs 2 workers x 64 slots. Only bounded, speed-independent properties are checked here
(how the window ends up relative to the limit, the share of 429s over a fixed number of lines, that
every line completes); ``python -m bench.aimd`` measures the throughput.
"""

from __future__ import annotations

import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HIDDEN_LIMIT = 8


def _limit(stack) -> tuple[float | None, float | None]:
    """The default provider's concurrency limit now, and its bound, from GET /metrics."""
    res = stack.http("GET", "/metrics", token=None)
    assert res.status == 200, res.body[:300]
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(res.body.decode()):
        for s in family.samples:
            if s.labels.get("provider") == "default" and s.name in (
                "sluice_provider_concurrency_limit",
                "sluice_provider_concurrency_max",
            ):
                found[s.name] = s.value
    return found.get("sluice_provider_concurrency_limit"), found.get("sluice_provider_concurrency_max")


def test_window_finds_a_hidden_concurrency_limit(stack_factory):
    stack = stack_factory.start(
        name="hidden-limit",
        workers=2,
        worker_concurrency=64,
        mock={"latency_ms": 100, "max_concurrency": HIDDEN_LIMIT, "retry_after": False},
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    n = 800
    _, created = stack.submit([stack.chat_line(f"hl-{run}-{i:03d}", f"hidden {i}") for i in range(n)], client=client)

    samples: list[tuple[int, float, float]] = []  # (lines done, limit, bound), while the batch runs
    deadline = time.monotonic() + 180
    while True:
        stack.check_alive()
        batch = client.batches.retrieve(created.id)
        limit, bound = _limit(stack)
        if limit is not None and bound is not None:
            samples.append((batch.request_counts.completed + batch.request_counts.failed, limit, bound))
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        assert time.monotonic() < deadline, f"the batch did not finish: {batch.request_counts}"
        time.sleep(0.2)
    stats = stack.mock_stats()
    share = stats["rejected_429"] / max(1, stats["requests"])
    late = sorted(limit for done, limit, _ in samples if done >= n // 2)
    print(
        f"\n[adaptive] hidden limit {HIDDEN_LIMIT}: requests={stats['requests']} 429={stats['rejected_429']} "
        f"({share:.1%}) peak_in_flight={stats['max_in_flight']}; limit in the second half of the run: "
        f"min={late[0] if late else None} median={late[len(late) // 2] if late else None} "
        f"max={late[-1] if late else None} ({len(late)} samples); bound {samples[-1][2] if samples else None}"
    )

    assert batch.status == "completed", batch
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0, batch.request_counts
    assert stats["accepted"] == n, stats
    # Without adaptation most of the 128 slots' requests would come back 429 (and be retried).
    assert share <= 0.10, f"{share:.1%} of the upstream requests got a 429: {stats['by_status']}"
    assert samples and samples[-1][2] == 128, f"the window's bound is the workers' slots (2 x 64): {samples[-1:]}"
    assert late, "no sample of the limit in the second half of the run"
    assert late[-1] <= 2 * HIDDEN_LIMIT, f"the window did not converge under {2 * HIDDEN_LIMIT}: {late}"
    assert late[len(late) // 2] >= HIDDEN_LIMIT / 2, f"the window collapsed well below the limit: {late}"
    assert late[0] >= 1


def test_a_configured_limit_bounds_the_window(stack_factory):
    """max_concurrency stays the bound: the window never passes it, and no 429 comes back."""
    stack = stack_factory.start(
        name="bounded",
        workers=2,
        worker_concurrency=32,
        mock={"latency_ms": 50, "max_concurrency": 6},
        upstream=False,
        env={"BOUNDED_KEY": "k"},
        config_toml='[providers.default]\nbase_url = "${mock_url}"\napi_key_env = "BOUNDED_KEY"\nmax_concurrency = 6\n',
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    _, created = stack.submit([stack.chat_line(f"bd-{run}-{i:03d}", f"bounded {i}") for i in range(300)], client=client)
    batch = stack.wait_for_batch(created.id, client=client, timeout=120)
    stats = stack.mock_stats()
    assert batch.status == "completed" and batch.request_counts.completed == 300, batch
    assert stats["rejected_429"] == 0 and stats["max_in_flight"] <= 6, stats
    limit, bound = _limit(stack)
    assert bound == 6 and limit is not None and 1 <= limit <= 6, (limit, bound)
