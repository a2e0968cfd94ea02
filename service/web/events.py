"""``GET /v1/batches/{batch_id}/events``: a batch's progress as Server-Sent Events.

The stream opens with an event ``batch`` carrying the batch object (the JSON of
``GET /v1/batches/{id}``), sends another whenever the status or the request counts change, a
comment line (``: ping``) after 15 s without an event, and ends after the terminal state with an
event ``done``. Progress is found by polling a few fields of the batch hash twice a second; the
whole object is only built when they changed.

A stopping web process ends its streams at once (``appkeys.EVENTS_STOP``) instead of holding its shutdown for
the grace period: the client reconnects, to another web process, and gets the current state.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from service.core import keys, store
from service.core.connections import REDIS_DOWN
from service.core.lifecycle import sleep_unless_stopped
from service.core.records import BatchField, BatchRecord
from service.core.wire import TERMINAL_STATUSES, json_encoder

from . import appkeys
from .owned import owned_batch

log = structlog.get_logger("sluice.events")

POLL_S = 0.5
KEEPALIVE_S = 15.0
# Fields whose change is worth an event (everything else changes only along with the status).
WATCHED = (BatchField.STATUS, BatchField.TOTAL, BatchField.COMPLETED, BatchField.FAILED)
# What a client reconnecting after the stream broke off should wait (ms).
RETRY_MS = 2000


def _snapshot(rec: BatchRecord) -> tuple[object, ...]:
    """What an event is sent on a change of (the ``WATCHED`` fields)."""
    return rec.status, rec.total, rec.completed, rec.failed


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def batch_events(request: web.Request) -> web.StreamResponse:
    """GET /batches/{batch_id}/events: the batch's progress until it ends."""
    r = request.app[appkeys.REDIS]
    stop = request.app[appkeys.EVENTS_STOP]
    h: BatchRecord | None = await owned_batch(request)  # 404 for unknown and foreign ids
    assert h is not None
    batch_id = h.id
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies such as nginx must pass events on at once
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    sent: tuple[object, ...] | None = None
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        last_write = loop.time()
        while True:
            if h is not None:
                sent = _snapshot(h)
                await response.write(_event("batch", json_encoder.encode(store.batch_from_record(h))))
                last_write = loop.time()
                if h.status in TERMINAL_STATUSES:
                    await response.write(_event("done", json_encoder.encode({"id": batch_id, "status": h.status})))
                    break
            elif loop.time() - last_write >= KEEPALIVE_S:
                await response.write(b": ping\n\n")
                last_write = loop.time()
            await sleep_unless_stopped(stop, POLL_S)
            if stop.is_set() or request.transport is None or request.transport.is_closing():
                break
            values = await r.hmget(keys.batch(batch_id), list(WATCHED))
            if values[0] is None:
                break  # the record expired or was deleted
            h = None
            if _snapshot(BatchRecord.from_values(WATCHED, values)) != sent:
                h = await store.get_batch_record(r, batch_id)
                if h is None:
                    break
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nobody to answer
    except REDIS_DOWN as e:
        # Headers are out: end the stream; the client reconnects and gets the current state.
        log.warning("events_stream_ended", batch_id=batch_id, error=type(e).__name__)
    return response


def add_routes(app: web.Application) -> None:
    """The events route under /v1 and on the bare path; ``appkeys.EVENTS_STOP`` is set when the app shuts down."""
    app[appkeys.EVENTS_STOP] = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        app[appkeys.EVENTS_STOP].set()

    app.on_shutdown.append(on_shutdown)
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/batches/{{batch_id}}/events", batch_events, allow_head=False)
