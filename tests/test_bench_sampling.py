"""The benchmark's background samplers (``bench.sampling.sampling``) always end with their block.

A memory sampler once sat inside a redis-py call that swallowed its cancellation; the harness then
waited for it forever (a 9.5-minute idle run). Each scenario here runs on an event loop of its own in
a thread, so that a sampler that never ends fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from bench.sampling import sampling
from tests.support.waiting import async_wait_until

# A hang detector: each scenario takes well under a second when sampling works.
BOUND_S = 60.0


def run_bounded(scenario) -> None:
    """Run ``scenario()`` on its own loop in a thread; fail if it does not end within the bound."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="sampling-scenario")
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive(), f"the sampling block did not end within {BOUND_S:.0f}s: the sampler hangs it"
    if errors:
        raise errors[0]


def test_a_sampler_that_swallows_its_cancellation_still_ends():
    calls = []

    async def scenario() -> None:
        inside = asyncio.Event()
        never = asyncio.Event()

        async def stubborn_sample() -> None:
            # Like the redis-py call: it blocks, and a cancellation that reaches it is swallowed.
            calls.append(1)
            inside.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                pass

        async with sampling(0.01, stubborn_sample, stop_wait=0.2):
            await inside.wait()
        after_block = len(calls)
        await asyncio.sleep(0.1)
        assert len(calls) == after_block, "the sampler kept sampling after its block ended"

    run_bounded(scenario)
    assert calls


def test_samples_repeat_while_the_block_runs_and_stop_after_it():
    calls = []

    async def scenario() -> None:
        async def sample() -> None:
            calls.append(1)

        async with sampling(0.001, sample):
            await async_wait_until(lambda: len(calls) >= 3, timeout=30, interval=0.001)
        after_block = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == after_block

    run_bounded(scenario)


def test_a_failing_sample_is_raised_when_the_block_ends():
    async def scenario() -> None:
        async def broken() -> None:
            raise RuntimeError("sampler broke")

        async with sampling(0.01, broken):
            await asyncio.sleep(0.05)

    with pytest.raises(RuntimeError, match="sampler broke"):
        run_bounded(scenario)
