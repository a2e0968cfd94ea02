"""The aiohttp front end: app factory, auth and error middlewares, and ``sluice web``."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from service.core import migrate, store
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Outage, Redis, connect
from service.core.errors import APIError
from service.core.heartbeat import Heartbeat
from service.core.lifecycle import process_name, run_until_signal
from service.core.storage import Storage, open_storage
from service.core.tokens import TokenAuth

from . import api, appkeys, dashboard, edge, events, metrics, retry
from .feeder import Feeder
from .publisher import Publisher

log = structlog.get_logger("sluice.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# /metrics takes no API token; SLUICE_METRICS_TOKEN, when set, guards it (service/web/metrics.py).
# The dashboard's static page holds no data: it asks for a token and calls the API with it.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", *dashboard.PUBLIC_PATHS})
# How long /readyz waits for Redis and for the storage probe.
READY_TIMEOUT_S = 3.0
# The object /readyz reads (its size) to check storage; written when it is missing (once per store).
READY_MARKER = "sluice-readyz-marker"


REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 200


def request_id(given: str | None) -> str:
    """The client's ``x-request-id`` when it is printable ASCII of at most 200 characters, else a new ``req_`` id."""
    if given and len(given) <= MAX_REQUEST_ID and all(" " <= ch <= "~" for ch in given):
        return given
    return f"req_{secrets.token_hex(16)}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id: echoed in ``x-request-id`` and carried by every log line of the request.

    The header is added as the response is prepared (``_send_request_id``), so streamed answers,
    errors and unknown routes carry it too; one ``http_request`` line per request is logged (at
    debug for successful reads, which the dashboard makes every 2 s).
    """
    rid = request_id(request.headers.get(REQUEST_ID_HEADER))
    request[appkeys.REQUEST_ID] = rid
    started = time.monotonic()
    status: int | None = None
    with structlog.contextvars.bound_contextvars(request_id=rid):
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            level = "debug" if request.method in ("GET", "HEAD") and status is not None and status < 400 else "info"
            getattr(log, level)(
                "http_request",
                method=request.method,
                path=request.path,
                status=status,
                ms=round((time.monotonic() - started) * 1000, 1),
            )


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(appkeys.REQUEST_ID)
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid


class InFlight:
    """Counts requests under way, so a stopping process can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self.idle.set()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI-style error body; nothing leaks as a bare 500 page."""
    try:
        response = await handler(request)
        request.app[appkeys.OUTAGE].ok()
        return response
    except APIError as e:
        return edge.error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message, code = f"Invalid URL ({request.method} {request.path})", "unknown_url"
        elif e.status == 405:
            message, code = f"Method {request.method} is not allowed on {request.path}.", "method_not_allowed"
        elif e.status == 413:
            message, code = "Request body is too large.", "request_too_large"
        else:
            message, code = e.reason or "Request failed.", None
        # Keep what the exception says about the resource, e.g. Allow on a 405.
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return edge.error_response(APIError(e.status, message, code=code, headers=headers))
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        raise
    except REDIS_DOWN as e:
        request.app[appkeys.OUTAGE].failed(e)
        return edge.error_response(
            APIError(
                503,
                "The service is temporarily unavailable; please retry.",
                type="server_error",
                code="service_unavailable",
                headers={"Retry-After": "1"},
            )
        )
    except Exception:
        log.exception("unhandled_error", method=request.method, path=request.path)
        return edge.error_response(
            APIError(500, "The server had an error while processing your request.", type="server_error")
        )


@web.middleware
async def declared_length_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A 413 for a body declared larger than the route takes, before any of it is read (and before auth)."""
    api.check_declared_length(request)
    return await handler(request)


def auth_middleware(auth: TokenAuth) -> Callable:
    """Bearer-token auth; the request gets its token's owner id and quotas (never the token)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "You didn't provide an API key. Provide it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        resolved = await auth.resolve(token.strip())
        if resolved is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        request[appkeys.OWNER], request[appkeys.QUOTAS] = resolved
        return await handler(request)

    return middleware


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return api.json_response({"status": "ok"})


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class StorageCheck:
    """/readyz's storage check: a read of a small marker object, no write per probe.

    Each probe asks for the marker's size (a HEAD on S3, a stat locally); only when the marker
    is missing (the first probe against a new store, or someone deleted it) is it written. A
    success is remembered for ``cache_s``, so frequent probes from several load balancers cost
    at most one storage request per ``cache_s`` and process; a failure is never remembered, so
    an outage shows within ``cache_s`` plus ``READY_TIMEOUT_S``.
    """

    def __init__(self, storage: Storage, cache_s: float) -> None:
        self.storage = storage
        self.cache_s = cache_s
        self.ok_until = 0.0

    async def __call__(self) -> None:
        now = time.monotonic()
        if now < self.ok_until:
            return
        if await self.storage.size(READY_MARKER) is None:
            await self.storage.write(READY_MARKER, _one_chunk(b"ok\n"))
        self.ok_until = now + self.cache_s


async def _warn_if_legacy(r: Redis) -> None:
    """Say once, at start-up, when Redis holds data of the layout before the shards (not moved yet)."""
    try:
        found = await migrate.legacy_layout_found(r)
    except REDIS_DOWN:
        return  # the loops report the outage; the next start looks again
    if found:
        log.warning(
            "legacy_key_layout",
            hint="this Redis holds files, batches or tokens of a version before the sharded key layout, "
            "which this version does not see: stop every Sluice process and run `sluice migrate-keys`",
        )


async def readyz(request: web.Request) -> web.Response:
    """Redis answers and storage answers (see :class:`StorageCheck`): the process can serve requests."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("redis", lambda: request.app[appkeys.REDIS].ping()),
        ("storage", request.app[appkeys.STORAGE_CHECK]),
    ):
        try:
            await asyncio.wait_for(probe(), timeout=READY_TIMEOUT_S)
            checks[name] = "ok"
        except asyncio.TimeoutError:
            checks[name] = f"no answer within {READY_TIMEOUT_S:g} s"
        except Exception as e:
            checks[name] = f"{type(e).__name__}: {e}"
    if all(v == "ok" for v in checks.values()):
        return api.json_response({"status": "ok"})
    return api.json_response({"status": "unavailable", **checks}, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus metrics of the whole cluster (service/web/metrics.py)."""
    return await metrics.handler(request, request.app[appkeys.REDIS], request.app[appkeys.SETTINGS])


def create_app(
    settings: Settings, *, redis: store.Redis | None = None, storage: Storage | None = None
) -> web.Application:
    """Build the web application; ``redis``/``storage`` may be injected (tests use fakeredis)."""
    in_flight = InFlight()
    r = redis if redis is not None else connect(settings)
    app = web.Application(
        middlewares=[
            request_id_middleware,
            in_flight.middleware,
            error_middleware,
            declared_length_middleware,
            auth_middleware(TokenAuth(settings, r)),
        ],
        client_max_size=api.MAX_JSON_BODY_BYTES,
        # Long (hostile) URLs reach the app and get a JSON 404 instead of aiohttp's text/plain 400.
        handler_args={"max_line_size": 65536},
    )
    app.on_response_prepare.append(_send_request_id)
    app[appkeys.IN_FLIGHT] = in_flight
    app[appkeys.SETTINGS] = settings
    app[appkeys.OUTAGE] = Outage(log)
    app[appkeys.STORAGE] = storage if storage is not None else open_storage(settings)
    app[appkeys.STORAGE_CHECK] = StorageCheck(app[appkeys.STORAGE], settings.readyz_storage_cache_s)
    app[appkeys.REDIS] = r
    # One name for the validator and feeder leases and the heartbeat: status shows who feeds what.
    name = process_name()
    feeder = Feeder(app[appkeys.REDIS], app[appkeys.STORAGE], settings, name)
    app[appkeys.PUBLISHER] = Publisher(app[appkeys.REDIS], app[appkeys.STORAGE], settings, feeder.wake, name)

    def beat_fields() -> dict[str, str | int]:
        stopping = appkeys.EVENTS_STOP in app and app[appkeys.EVENTS_STOP].is_set()
        return {
            "state": "stopping" if stopping else "serving",
            "in_flight": in_flight.count,
            "feeding": len(feeder.renew_at),
            "port": settings.port,
        }

    async def background(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        heartbeat = Heartbeat(app[appkeys.REDIS], name, "web", fields=beat_fields)
        heartbeat.start()
        tasks = [
            asyncio.create_task(app[appkeys.PUBLISHER].run(stop), name="publisher"),
            asyncio.create_task(feeder.run(stop), name="feeder"),
            asyncio.create_task(edge.sweep_orphans(app[appkeys.STORAGE], settings, stop), name="orphans"),
            asyncio.create_task(_warn_if_legacy(app[appkeys.REDIS]), name="legacy-check"),
        ]
        yield
        stop.set()
        app[appkeys.PUBLISHER].wake.set()
        feeder.wake.set()
        # The feeder gives its leases up on the way out; a validation cut short keeps its lease
        # until it expires, then a peer redoes it.
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await heartbeat.close()
        if redis is None:
            await app[appkeys.REDIS].aclose()
        if storage is None:
            await app[appkeys.STORAGE].aclose()

    app.cleanup_ctx.append(background)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    api.add_routes(app)
    retry.add_routes(app)
    events.add_routes(app)
    dashboard.add_routes(app)
    return app


class WebServer:
    """``sluice web`` as a process: serve until ``stop`` is set, then let requests under way finish."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()

    async def run(self) -> None:
        """Serve on ``$PORT``; after ``stop``, stop listening and drain within the grace period."""
        grace = self.settings.shutdown_grace_s
        app = create_app(self.settings)
        runner = edge.EdgeRunner(
            app, head_timeout=self.settings.header_timeout_s, access_log=None, shutdown_timeout=grace
        )
        await runner.setup()
        site = web.TCPSite(runner, host="0.0.0.0", port=self.settings.port)
        await site.start()
        log.info("web_listening", port=self.settings.port)
        await self.stop.wait()
        # Stop listening first and let requests under way (uploads still streaming in) finish:
        # aiohttp's own shutdown stops reading request bodies at once.
        await site.stop()
        app[appkeys.EVENTS_STOP].set()  # event streams end now: they would hold the shutdown for the whole grace
        log.info("web_stopping", in_flight=app[appkeys.IN_FLIGHT].count, grace_s=grace)
        try:
            await asyncio.wait_for(app[appkeys.IN_FLIGHT].idle.wait(), timeout=grace)
        except asyncio.TimeoutError:
            log.warning("web_requests_cut", in_flight=app[appkeys.IN_FLIGHT].count)
        await runner.cleanup()
        log.info("web_stopped")


def run(settings: Settings) -> None:
    """``sluice web``: serve HTTP on ``$PORT`` until SIGTERM/SIGINT."""
    run_until_signal("web", settings, lambda: WebServer(settings))
