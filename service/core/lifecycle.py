"""What every long-running process shares: stop on a signal, sleep without missing the stop."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from typing import Callable, Protocol

from . import tracing
from .config import Settings
from .log import configure_logging, settings_secrets


class Stoppable(Protocol):
    stop: asyncio.Event

    async def run(self) -> None: ...


def process_name() -> str:
    """Unique per process: a replacement may briefly share the host name and even the pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, returning at once when ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


def run_until_signal(process: str, settings: Settings, make: Callable[[], Stoppable]) -> None:
    """Run ``make().run()``; SIGTERM/SIGINT only set its ``stop`` event, so it drains itself.

    Traces are exported (OpenTelemetry) when the settings name an endpoint, and flushed on the way out.
    """
    configure_logging(settings.log_level, process=process, secrets=settings_secrets(settings))
    tracing.setup(settings, process)

    async def main() -> None:
        component = make()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, component.stop.set)
        await component.run()

    try:
        asyncio.run(main())
    finally:
        tracing.shutdown()
