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


class _Attempts:
    """What a wait has seen so far, and its deadline: one bookkeeping for the sync and async waits."""

    def __init__(self, predicate: Callable[..., Any], timeout: float, message: str | Callable[[], str] | None):
        self.predicate, self.timeout, self.message = predicate, timeout, message
        self.deadline = time.monotonic() + timeout
        self.last: Any = None
        self.last_exc: BaseException | None = None

    def got(self, value: Any) -> bool:
        """Note a value the predicate returned; True when it ends the wait."""
        self.last, self.last_exc = value, None
        return bool(value)

    def failed(self, exc: BaseException) -> None:
        self.last_exc = exc

    def raise_if_late(self) -> None:
        if time.monotonic() >= self.deadline:
            seen = f"last error {self.last_exc!r}" if self.last_exc is not None else f"last value {self.last!r}"
            raise WaitTimeout(
                f"timed out after {self.timeout:.1f}s waiting for {_describe(self.predicate, self.message)} ({seen})"
            )


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
    attempts = _Attempts(predicate, timeout, message)
    while True:
        if check is not None:
            check()
        try:
            if attempts.got(predicate()):
                return attempts.last
        except ignore as exc:
            attempts.failed(exc)
        attempts.raise_if_late()
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
    attempts = _Attempts(predicate, timeout, message)
    while True:
        if check is not None:
            check()
        try:
            value = predicate()
            if attempts.got(await value if inspect.isawaitable(value) else value):
                return attempts.last
        except ignore as exc:
            attempts.failed(exc)
        attempts.raise_if_late()
        await asyncio.sleep(interval)
