"""The HTTP edge: how much time a slow, stalled or hostile client can hold the web process for.

- Request heads (:class:`EdgeRunner`): a connection must deliver a complete request head within
  ``header_timeout_s`` of opening, and within as long of its previous response when it is kept
  alive, or it is closed. aiohttp has no such timeout of its own (its keep-alive timeout is an hour).
- Request bodies (:func:`within_idle`): a read of a request body that gets no data for
  ``body_idle_timeout_s`` aborts the request with a 408 and closes the connection.
- Declared sizes: a ``Content-Length`` over a route's limit is answered 413 before any of the body
  is read (the check itself is the API's, ``api.check_declared_length``; :func:`expect_continue`
  is the ``Expect: 100-continue`` half of it).
- Leftovers (:func:`sweep_orphans`): temporary files of uploads whose process died mid-way.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler

from service.core.config import Settings
from service.core.errors import APIError
from service.core.lifecycle import sleep_unless_stopped
from service.core.storage import Storage

log = structlog.get_logger("sluice.web")

T = TypeVar("T")

# How often a web process looks for leftovers of dead uploads (it also does at start-up).
ORPHAN_SWEEP_EVERY_S = 60.0


def error_response(e: APIError) -> web.Response:
    """The response for an API error; the connection closes after it when the error says so."""
    response = web.Response(body=e.body(), status=e.status, content_type="application/json", headers=e.headers)
    if e.close:
        response.force_close()
    return response


# ----------------------------------------------------------------------------- request heads
class EdgeProtocol(RequestHandler):
    """aiohttp's per-connection protocol, with a deadline for each request head.

    The timer is armed when the connection opens and whenever the connection has answered every
    request it received (idle, waiting for the next head); it is disarmed the moment the parser
    completes a head, so a request being handled (a long upload, an event stream) never races it.
    The deadline runs from the previous response rather than from the next request's first byte,
    which also covers a partial head sent behind a complete one (pipelined): the parser holds such
    bytes where nothing else can see them. The price is that an idle keep-alive connection is
    closed after the same time, as most servers do within a few seconds anyway.
    """

    # RequestHandler has __slots__: the subclass declares its own to stay as lean.
    __slots__ = ("_head_timeout", "_head_timer", "_answered", "_last_body")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = 0  # responses finished; the parser counts heads in _request_count
        self._last_body: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1
            self._last_body = request.content
            if self._answered >= self._request_count:
                self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self.transport is not None:
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._answered < self._request_count:
            return  # a head completed as the timer fired: that request is under way
        if self._last_body is not None and not self._last_body.is_eof():
            # aiohttp still drains the unread body of the last request, for a bounded time
            # (lingering close, which lets the client read the answer): wait for that first.
            self._arm_head_timer()
            return
        self.force_close()


class EdgeServer(web.Server):
    """aiohttp's low-level server (the protocol factory) making :class:`EdgeProtocol` connections."""

    def __init__(self, made: web.Server, head_timeout: float) -> None:
        # The same handler, request factory and handler arguments (max_line_size, access log, ...)
        # as the server the runner made.
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        self.head_timeout = head_timeout

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, loop=self._loop, head_timeout=self.head_timeout, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections have a request-head deadline of ``head_timeout`` seconds."""

    def __init__(self, app: web.Application, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        return EdgeServer(await super()._make_server(), self.head_timeout)


# ----------------------------------------------------------------------------- request bodies
async def within_idle(read: Awaitable[T], seconds: float) -> T:
    """Await one read of a request body; a 408 that closes the connection if no data came for ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await read
    except TimeoutError:
        raise APIError(
            408,
            f"The request body stalled: no data arrived for {seconds:g} s, so the request was aborted.",
            code="request_timeout",
            close=True,
        ) from None


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's answer to ``Expect``: ``100 Continue`` (HTTP/1.1), else a 417."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        return error_response(
            APIError(417, f"Unsupported Expect header: {expect[:64]!r}.", code="expectation_failed", close=True)
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim answer does not count as the response having started.
    request.writer.output_size = 0
    return None


# ----------------------------------------------------------------------------- leftovers
def orphan_idle_s(settings: Settings) -> float:
    """How long a temporary upload file must be untouched before it is taken for an orphan.

    A live upload writes to its file whenever data arrives, and is aborted (its file removed)
    after ``body_idle_timeout_s`` without data; twice that plus a minute leaves room for a slow
    disk and for clock differences between processes sharing the directory.
    """
    return 2 * settings.body_idle_timeout_s + 60.0


async def sweep_orphans(storage: Storage, settings: Settings, stop: asyncio.Event) -> None:
    """Remove leftovers of dead uploads now (start-up) and every ``ORPHAN_SWEEP_EVERY_S`` until ``stop``."""
    while not stop.is_set():
        try:
            if removed := await storage.remove_orphans(orphan_idle_s(settings)):
                log.info("upload_orphans_removed", count=removed)
        except Exception as e:
            log.warning("upload_orphans_sweep_failed", error=f"{type(e).__name__}: {e}")
        await sleep_unless_stopped(stop, ORPHAN_SWEEP_EVERY_S)
