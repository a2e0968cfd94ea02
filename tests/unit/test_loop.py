"""The loop skeleton every role runs (service/core/loop.py): stop, outages, bugs, cancellation.

Each test drives ``run_loop`` with a scripted pass. Waits that would take real time are either
cut short by the stop under test, or recorded (``sleeps``) instead of slept, so nothing here
depends on the machine's speed: the bounds on ``asyncio.wait_for`` are failure deadlines only.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.testing import capture_logs

from service.core import loop
from service.core.connections import Outage

DEADLINE_S = 30.0  # a failure deadline on a busy machine, never a measurement
FOREVER_S = 3600.0


class Script:
    """A pass that plays a script: each item is an exception to raise or a wait to return."""

    def __init__(self, *items: BaseException | float, then: float = FOREVER_S) -> None:
        self.items = list(items)
        self.then = then
        self.calls = 0
        self.called = asyncio.Event()

    async def __call__(self) -> float:
        self.calls += 1
        self.called.set()
        item = self.items.pop(0) if self.items else self.then
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait_calls(self, n: int) -> None:
        while self.calls < n:
            self.called.clear()
            await asyncio.wait_for(self.called.wait(), DEADLINE_S)


@pytest.fixture
def sleeps(monkeypatch):
    """The backoffs the loop asked for, recorded instead of slept (each yields to the event loop).

    The one seam patched here: how long a backoff lasts is the behaviour under test, and
    measuring it with a clock would make the test depend on the machine's speed.
    """
    asked: list[float] = []

    async def record(stop: asyncio.Event, seconds: float) -> None:
        asked.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(loop, "_back_off", record)
    return asked


def _start(step, stop: asyncio.Event, **options) -> asyncio.Task[None]:
    log = structlog.get_logger("test.loop")
    return asyncio.create_task(
        loop.run_loop(step, stop=stop, outage=Outage(log), log=log, error_event="test_error", **options)
    )


def _events(logged: list[dict], *names: str) -> list[str]:
    return [e["event"] for e in logged if e["event"] in names]


async def test_stop_ends_an_idle_wait_at_once():
    stop = asyncio.Event()
    step = Script(then=FOREVER_S)
    task = _start(step, stop)
    await step.wait_calls(1)
    stop.set()
    await asyncio.wait_for(task, DEADLINE_S)  # an hour's idle wait, cut short
    assert step.calls == 1


async def test_stop_ends_a_wait_that_wake_could_end_too():
    stop, wake = asyncio.Event(), asyncio.Event()
    step = Script(then=FOREVER_S)
    task = _start(step, stop, wake=wake)
    await step.wait_calls(1)
    stop.set()
    await asyncio.wait_for(task, DEADLINE_S)
    assert step.calls == 1


async def test_stop_ends_a_backoff_at_once():
    stop = asyncio.Event()
    step = Script(then=FOREVER_S)
    step.items = [RuntimeError("bug")]
    with capture_logs():
        task = _start(step, stop, error_backoff_s=FOREVER_S)
        await step.wait_calls(1)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    assert step.calls == 1


async def test_a_stop_set_before_the_start_runs_no_pass():
    stop = asyncio.Event()
    stop.set()
    step = Script()
    await asyncio.wait_for(_start(step, stop), DEADLINE_S)
    assert step.calls == 0


async def test_wake_ends_the_wait_and_a_wake_during_a_pass_is_kept():
    stop, wake = asyncio.Event(), asyncio.Event()

    async def step() -> float:
        calls.append(1)
        if len(calls) == 1:
            wake.set()  # e.g. a batch created while this pass ran
        if len(calls) == 2:
            stop.set()
        return FOREVER_S

    calls: list[int] = []
    await asyncio.wait_for(_start(step, stop, wake=wake), DEADLINE_S)
    assert len(calls) == 2


async def test_an_outage_backs_off_and_is_logged_once_then_its_end(sleeps):
    stop = asyncio.Event()
    down = [RedisConnectionError("refused"), RedisTimeoutError("timed out"), RedisConnectionError("refused")]
    step = Script(*down, 0.0, FOREVER_S)
    with capture_logs() as logged:
        task = _start(step, stop)
        await step.wait_calls(5)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    # Exponential (Outage's); the pass's own waits are pacing, not backoffs.
    assert sleeps == [0.1, 0.2, 0.4]
    assert _events(logged, "redis_unavailable", "redis_reconnected") == ["redis_unavailable", "redis_reconnected"]
    warning = next(e for e in logged if e["event"] == "redis_unavailable")
    assert warning["log_level"] == "warning" and "ConnectionError" in warning["error"]
    assert not _events(logged, "test_error")


async def test_a_second_outage_is_logged_again_and_backs_off_from_the_start(sleeps):
    stop = asyncio.Event()
    step = Script(RedisConnectionError("a"), RedisConnectionError("a"), 0.0, RedisConnectionError("b"), 0.0, FOREVER_S)
    with capture_logs() as logged:
        task = _start(step, stop)
        await step.wait_calls(6)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    assert sleeps == [0.1, 0.2, 0.1]
    assert _events(logged, "redis_unavailable", "redis_reconnected") == [
        "redis_unavailable",
        "redis_reconnected",
        "redis_unavailable",
        "redis_reconnected",
    ]


async def test_an_unexpected_exception_is_logged_with_its_traceback_and_the_loop_carries_on(sleeps):
    stop = asyncio.Event()
    step = Script(KeyError("surprise"), 0.0, FOREVER_S)
    with capture_logs() as logged:
        task = _start(step, stop)
        await step.wait_calls(3)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    assert sleeps == [loop.ERROR_BACKOFF_S]
    errors = [e for e in logged if e["event"] == "test_error"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error" and errors[0]["exc_info"] is True
    # A bug is not an outage.
    assert not _events(logged, "redis_unavailable", "redis_reconnected")


async def test_a_bug_during_an_outage_does_not_end_it(sleeps):
    stop = asyncio.Event()
    step = Script(RedisConnectionError("down"), ValueError("bug"), RedisConnectionError("down"), 0.0, FOREVER_S)
    with capture_logs() as logged:
        task = _start(step, stop)
        await step.wait_calls(5)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    assert sleeps == [0.1, loop.ERROR_BACKOFF_S, 0.2]
    assert _events(logged, "redis_unavailable", "redis_reconnected") == ["redis_unavailable", "redis_reconnected"]


async def test_cancelling_the_loop_mid_pass_propagates():
    stop, entered, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def step() -> float:
        entered.set()
        await never.wait()
        return 0.0

    with capture_logs() as logged:
        task = _start(step, stop)
        await asyncio.wait_for(entered.wait(), DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_S)
    assert task.cancelled()
    assert not _events(logged, "test_error")


async def test_cancelling_the_loop_mid_wait_propagates():
    stop, wake = asyncio.Event(), asyncio.Event()
    step = Script(then=FOREVER_S)
    task = _start(step, stop, wake=wake)
    await step.wait_calls(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    assert task.cancelled()


async def test_a_cancelled_error_raised_by_the_pass_is_not_swallowed():
    stop = asyncio.Event()
    step = Script(asyncio.CancelledError())
    with capture_logs() as logged:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(_start(step, stop), DEADLINE_S)
    assert step.calls == 1
    assert not _events(logged, "test_error")


async def test_wait_first_returns_when_a_task_ends_or_stop_is_set():
    stop, release = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(release.wait())
    waiting = asyncio.create_task(loop.wait_first(stop, [held]))
    await asyncio.sleep(0)
    assert not waiting.done()
    release.set()
    await asyncio.wait_for(waiting, DEADLINE_S)

    never = asyncio.create_task(asyncio.Event().wait())
    waiting = asyncio.create_task(loop.wait_first(stop, [never]))
    stop.set()
    await asyncio.wait_for(waiting, DEADLINE_S)
    assert not never.done()  # only waited on, never cancelled
    never.cancel()
