"""Group commit of a worker's results: many lines reach Redis in one round trip."""

from __future__ import annotations

import asyncio

from service.core import store
from service.core.connections import REDIS_DOWN, Outage


class Recorder:
    """Records line results exactly once (``store.record_many``), batching them.

    While one write is under way, the results finishing meanwhile queue up and go together in
    the next write: under load a round trip carries many lines, and a lone result waits for
    nothing. Writes are retried through a Redis outage: the provider was paid for the answers.
    """

    def __init__(self, redis: store.Redis, outage: Outage) -> None:
        self.redis = redis
        self.outage = outage
        self.queued: dict[str, list[store.Result]] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self.writer: asyncio.Task[None] | None = None

    async def record(self, batch_id: str, result: store.Result) -> None:
        """Return once ``(index, entry_id, outcome, result_line[, usage][, shape, micros])`` of ``batch_id`` is
        recorded."""
        self.queued.setdefault(batch_id, []).append(result)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(written)
        if self.writer is None:
            self.writer = asyncio.create_task(self._write(), name="recorder")
        await written

    async def settle(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until everything queued so far has been written."""
        if self.writer is not None:
            await asyncio.wait({self.writer}, timeout=timeout)

    async def _write(self) -> None:
        while self.queued:
            results, self.queued = self.queued, {}
            waiters, self.waiters = self.waiters, []
            error: Exception | None = None
            while True:
                try:
                    await store.record_many(self.redis, results)
                    self.outage.ok()
                    break
                except REDIS_DOWN as e:
                    await asyncio.sleep(self.outage.failed(e))
                except Exception as e:  # a bug: let every waiting line fail visibly
                    error = e
                    break
            for waiter in waiters:
                if waiter.done():
                    continue  # its line was cancelled at shutdown; the write happened anyway
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        self.writer = None
