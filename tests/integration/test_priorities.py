"""Priorities and deadlines when the provider is the bottleneck.

Every stack here puts a provider allowing 8 requests in flight (configured, so no 429 muddles the
counts) behind 2 workers with more slots than that, so the provider is what the batches share.
Shares are measured with counts (lines finished per batch between two snapshots taken while every
batch runs), never with time.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SATURATED_TOML = """
[providers.default]
base_url = "${mock_url}"
api_key_env = "PRIO_PROVIDER_KEY"
max_concurrency = 8
"""
ACTIVE = {"validating", "in_progress"}


def _saturated(stack_factory, name: str, latency_ms: int, **kw):
    return stack_factory.start(
        name=name,
        workers=2,
        worker_concurrency=16,
        mock={"latency_ms": latency_ms, "max_concurrency": 8},
        upstream=False,
        config_toml=SATURATED_TOML,
        env={"PRIO_PROVIDER_KEY": "k", **kw.pop("env", {})},
        **kw,
    )


def _batch(stack, client, tag: str, n: int, *, priority: str | None = None, window: str = "24h"):
    f = stack.upload_jsonl([stack.chat_line(f"{tag}-{i:05d}", f"{tag} {i}") for i in range(n)], client=client)
    headers = {"x-sluice-priority": priority} if priority else {}
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window=window, extra_headers=headers
    )


def _done(client, batch_id: str) -> tuple[int, str]:
    b = client.batches.retrieve(batch_id)
    return b.request_counts.completed + b.request_counts.failed, b.status


def _shares(stack, wait_until, batches: dict[str, tuple], *, warm_up: int, window: int) -> dict[str, float]:
    """Each batch's share of the lines finished between two snapshots, ``window`` lines apart in all,
    taken once ``warm_up`` lines are done; every batch must still run at the second one."""

    def snapshot():
        return {name: _done(client, b.id) for name, (client, b) in batches.items()}

    def warmed_up():
        s = snapshot()
        return (
            s if all(st == "in_progress" for _, st in s.values()) and sum(d for d, _ in s.values()) >= warm_up else None
        )

    first = wait_until(
        warmed_up,
        timeout=120,
        interval=0.2,
        message="every batch to run and the warm-up to pass",
        check=stack.check_alive,
    )
    base = sum(d for d, _ in first.values())

    def window_done():
        s = snapshot()
        return s if sum(d for d, _ in s.values()) >= base + window else None

    second = wait_until(
        window_done, timeout=120, interval=0.1, message=f"{window} more lines to finish", check=stack.check_alive
    )
    assert all(st in ACTIVE for _, st in second.values()), f"a batch ended inside the window: {second}"
    delta = {name: second[name][0] - first[name][0] for name in batches}
    total = sum(delta.values())
    print(f"\n[shares] lines finished per batch over the window: {delta} (of {total})")
    return {name: d / total for name, d in delta.items()}


def _cancel_all(client, batches) -> None:
    for b in batches:
        if client.batches.retrieve(b.id).status in ACTIVE:
            client.batches.cancel(b.id)


def test_priorities_share_a_saturated_provider_4_2_1(stack_factory, wait_until):
    stack = _saturated(stack_factory, "priorities", 50)
    client = stack.client()
    run = uuid.uuid4().hex[:6]
    made = {
        prio: (client, _batch(stack, client, f"{prio}-{run}", 2000, priority=prio))
        for prio in ("high", "normal", "low")
    }
    shares = _shares(stack, wait_until, made, warm_up=200, window=840)
    print(
        f"[shares] high {shares['high']:.3f} normal {shares['normal']:.3f} low {shares['low']:.3f} "
        f"(ideal {4 / 7:.3f} {2 / 7:.3f} {1 / 7:.3f})"
    )
    for prio, weight in (("high", 4), ("normal", 2), ("low", 1)):
        ideal = weight / 7
        assert abs(shares[prio] - ideal) <= 0.2 * ideal, f"{prio}: share {shares[prio]:.3f}, ideal {ideal:.3f}"
    assert shares["low"] > 0, "a low batch must still progress"
    _cancel_all(client, [b for _, b in made.values()])


def test_marking_everything_high_does_not_take_another_tokens_share(stack_factory, wait_until):
    stack = _saturated(stack_factory, "prio-tokens", 50)
    token_a, token_b = stack.tokens
    a, b = stack.client(token=token_a), stack.client(token=token_b)
    run = uuid.uuid4().hex[:6]
    made = {
        "a1": (a, _batch(stack, a, f"a1-{run}", 2000, priority="high")),
        "a2": (a, _batch(stack, a, f"a2-{run}", 2000, priority="high")),
        "b": (b, _batch(stack, b, f"b-{run}", 2000, priority="low")),
    }
    shares = _shares(stack, wait_until, made, warm_up=200, window=800)
    print(f"[shares] token A (2 x high) {shares['a1'] + shares['a2']:.3f}, token B (1 x low) {shares['b']:.3f}")
    assert abs(shares["b"] - 0.5) <= 0.1, f"token B got {shares['b']:.3f} of the provider, not half"
    assert abs(shares["a1"] - shares["a2"]) <= 0.1, "token A's two high batches should share its half evenly"
    for client, batch in made.values():
        _cancel_all(client, [batch])


def test_a_1h_batch_overtakes_24h_batches_to_meet_its_deadline(stack_factory, wait_until):
    """Time is shrunk by SLUICE_COMPLETION_WINDOW_S (the length of "24h", which every window scales with):
    1h lasts 80 s here. Three high-priority 24 h batches, created first, keep the provider saturated;
    a low-priority 1 h batch of 320 lines then gets 1/13 of it, about 3 lines/s: 100 s, past its deadline.
    Boosted as a batch at risk it takes most of the provider and is done in a fraction of that."""
    stack = _saturated(stack_factory, "deadline", 200, env={"SLUICE_COMPLETION_WINDOW_S": str(80 * 24)})
    client = stack.client()
    run = uuid.uuid4().hex[:6]
    long_ones = [_batch(stack, client, f"day{k}-{run}", 3000, priority="high") for k in range(3)]
    wait_until(
        lambda: sum(_done(client, b.id)[0] for b in long_ones) >= 100,
        timeout=60,
        interval=0.2,
        message="the 24 h batches to saturate the provider",
        check=stack.check_alive,
    )
    urgent = _batch(stack, client, f"hour-{run}", 320, priority="low", window="1h")
    assert urgent.expires_at - urgent.created_at == 80

    finished = stack.wait_for_batch(urgent.id, client=client, timeout=150, interval=0.2)
    others = [client.batches.retrieve(b.id) for b in long_ones]
    ended = finished.completed_at or finished.expired_at or finished.created_at
    print(
        f"\n[deadline] the 1h batch (80 s here) ended {finished.status} after {ended - finished.created_at} s; "
        f"the 24h batches then had "
        f"{[o.request_counts.completed for o in others]} of 3000 lines done"
    )
    assert finished.status == "completed", finished
    assert finished.request_counts.completed == 320 and finished.request_counts.failed == 0, finished.request_counts
    for o in others:
        assert o.status in ACTIVE, f"a 24h batch ended before the 1h batch: {o.status}"
    _cancel_all(client, long_ones)
