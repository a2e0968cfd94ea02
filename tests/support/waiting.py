"""Polling with a bound: the only way tests wait (never sleep-then-assert).

A bound here is a failure deadline, not a measurement: make it generous (a busy 2-core CI box
runs five suites at once), since a passing wait returns as soon as its condition holds.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable


class WaitTimeout(AssertionError):
    """A polled condition did not become true in time."""


def _describe(predicate: Callable[..., Any], message: str | Callable[[], str] | None) -> str:
    if callable(message):
        try:
            return message()
        except Exception as exc:  # the description must never hide the timeout itself
            return f"<message callback failed: {exc!r}>"
    if message:
        return message
    return getattr(predicate, "__name__", repr(predicate))


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    check: Callable[[], None] | None = None,
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that value.

    ``ignore``: exception types raised by the predicate that count as "not yet" (any other exception
    propagates at once). ``check``: called before every attempt; it raises to abort the wait early
    (for instance when a process died). On timeout raises :class:`WaitTimeout` naming ``message``
    (a string, or a callable evaluated then) and the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            seen = f"last error {last_exc!r}" if last_exc is not None else f"last value {last!r}"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {_describe(predicate, message)} ({seen})")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    check: Callable[[], None] | None = None,
) -> Any:
    """Async twin of :func:`wait_until`; ``predicate`` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            seen = f"last error {last_exc!r}" if last_exc is not None else f"last value {last!r}"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {_describe(predicate, message)} ({seen})")
        await asyncio.sleep(interval)
