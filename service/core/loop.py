"""The loop every long-running role runs: one pass, a wait, again, until stopped.

The publisher, the feeder, the finalizer and the worker each say what one pass does and how long
to wait after it; :func:`run_loop` owns the rest, the same for all of them:

- a lost Redis (``REDIS_DOWN``) is logged once when it starts and once when it ends (``Outage``),
  and retried with an exponential backoff;
- any other exception is a bug or an unexpected failure: logged with its traceback, then the
  role carries on after ``ERROR_BACKOFF_S`` (one bad pass must not end the process, nor spin);
- every wait ends at once when ``stop`` is set, so a stopping process is never held up by one
  (the role's own drain, in its ``finally``, then has the whole grace period);
- cancellation is never swallowed: the task ends where it stands.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable

from structlog.typing import FilteringBoundLogger

from .connections import REDIS_DOWN, Outage
from .lifecycle import sleep_unless_stopped

# After an unexpected exception: long enough that a bug hit on every pass does not flood the log
# or spin a core, short enough that a passing failure costs little.
ERROR_BACKOFF_S = 1.0

Pass = Callable[[], Awaitable[float]]


async def run_loop(
    step: Pass,
    *,
    stop: asyncio.Event,
    outage: Outage,
    log: FilteringBoundLogger,
    error_event: str,
    wake: asyncio.Event | None = None,
    error_backoff_s: float = ERROR_BACKOFF_S,
) -> None:
    """Run ``step`` until ``stop`` is set.

    ``step`` does one pass and returns how many seconds to wait before the next (0: at once).
    ``wake``, when given, ends that wait early (it is cleared before each pass, so a wake-up
    that arrives during a pass is not lost); it never shortens a backoff. A Redis outage is
    reported through ``outage``; any other ``Exception`` is logged as ``error_event`` with its
    traceback. ``asyncio.CancelledError`` propagates.
    """
    while not stop.is_set():
        if wake is not None:
            wake.clear()
        try:
            wait = await step()
        except REDIS_DOWN as e:
            await _back_off(stop, outage.failed(e))
            continue
        except Exception:
            log.exception(error_event)
            await _back_off(stop, error_backoff_s)
            continue
        if stop.is_set():
            # The pass may have been cut short by the stop: it says nothing about Redis.
            break
        outage.ok()
        if wait > 0:
            await _pause(stop, wake, wait)


async def wait_first(stop: asyncio.Event, aws: Iterable[asyncio.Future[Any]], timeout: float | None = None) -> None:
    """Wait until one of ``aws`` is done, ``stop`` is set, or ``timeout`` seconds have passed."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([*aws, stopped], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        await asyncio.gather(stopped, return_exceptions=True)


async def _back_off(stop: asyncio.Event, seconds: float) -> None:
    """Wait out a failure (unless stopped); apart from the pacing waits, so tests can see it."""
    await sleep_unless_stopped(stop, seconds)


async def _pause(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` or ``wake`` is set."""
    if wake is None:
        await sleep_unless_stopped(stop, seconds)
        return
    woken = asyncio.ensure_future(wake.wait())
    try:
        await wait_first(stop, [woken], timeout=seconds)
    finally:
        woken.cancel()
        await asyncio.gather(woken, return_exceptions=True)
