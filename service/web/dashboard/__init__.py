"""The web dashboard: static page at ``/dashboard`` and the JSON it shows (``/v1/sluice/cluster``,
``/v1/sluice/history``).

The page (``index.html``, ``app.js``, ``style.css`` beside this file; no build step, nothing from
a CDN) is public like ``/healthz``: it holds no data. It asks for an API token, keeps it in the
tab's ``sessionStorage`` and calls the JSON API with ``Authorization: Bearer``, so it sees exactly
what that token sees through the API.

``GET /v1/sluice/cluster`` (and ``/sluice/cluster``) needs a valid token, any token: it shows the
heartbeats of the web, worker and finalizer processes (with how many running batches each
finalizer holds), the providers' state and cluster-wide line
counters, the same facts ``sluice status`` and ``/metrics`` show, but never another token's batches
(only how many batches are running in all, and the caller's own). ``GET /v1/sluice/history``, with
any token too, serves the per-minute history of the whole cluster (service/core/counters.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from service.core import counters
from service.core.cluster import snapshot
from service.core.errors import bad_request

from .. import api, appkeys

# GET /v1/sluice/history?minutes=N: the window served by default, and at most (the whole history).
HISTORY_DEFAULT_MINUTES = 60
HISTORY_MAX_MINUTES = counters.HISTORY_S // counters.MINUTE_S

HERE = Path(__file__).resolve().parent
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# Served without a token (web.py's auth middleware lets them through).
PUBLIC_PATHS = frozenset({"/dashboard", "/dashboard/", *(f"/dashboard/{name}" for name in ASSETS)})
# The page runs only its own script and talks only to its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard/")


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(
        body=(HERE / name).read_bytes(), content_type=ASSETS[name], charset="utf-8", headers=SECURITY_HEADERS
    )


async def cluster(request: web.Request) -> web.Response:
    """GET /v1/sluice/cluster: processes, providers and counters of the whole cluster, as JSON."""
    settings = request.app[appkeys.SETTINGS]
    snap = await snapshot(request.app[appkeys.REDIS], settings)
    owner = request[appkeys.OWNER]
    processes = []
    for p in sorted(snap.processes, key=lambda p: (p.role, not p.live, p.name)):
        processes.append(
            {
                "name": p.name,
                "role": p.role,
                "host": p.host,
                "pid": p.pid,
                "live": p.live,
                "last_beat_s": round(p.age_s, 1),
                "started_at": p.started_at,
                "state": p.fields.get("state", ""),
                "leased_batches": snap.leased_batches(p.name) if p.role == "finalizer" else None,
                # Lines for a worker, HTTP requests for a web process.
                "in_flight": p.int("in_flight") if p.role in ("worker", "web") else None,
                "concurrency": p.int("concurrency") if p.role == "worker" else None,
            }
        )
    providers = []
    for prov in snap.providers:
        counts: dict[str, int] = {}
        for k, v in snap.upstream.items():
            kind, _, name = k.partition("|")
            if name == prov.name:
                counts[kind] = counts.get(kind, 0) + v
        state = f"paused {prov.paused_for_s:.1f}s" if prov.paused_for_s > 0 else "ramping up" if prov.ramping else "ok"
        providers.append(
            {
                "name": prov.name,
                "state": state,
                "paused_for_s": round(prov.paused_for_s, 1),
                "requests_in_flight": prov.requests_in_flight,
                "leases": prov.leases,
                "max_concurrency": prov.max_concurrency,
                # The limit every worker follows now (the adaptive window), and what bounds it.
                "adaptive": prov.adaptive,
                "concurrency_limit": prov.limit,
                "concurrency_max": prov.ceiling,
                "rate_limited": counts.get("rate_limited", 0),
                "retries": counts.get("retries", 0),
            }
        )
    return api.json_response(
        {
            "object": "sluice.cluster",
            "now": snap.now,
            "processes": processes,
            "providers": providers,
            "lines": {"completed": snap.lines.get("completed", 0), "failed": snap.lines.get("failed", 0)},
            "running_batches": {"total": len(snap.batches), "yours": sum(1 for b in snap.batches if b.owner == owner)},
            # What one batch may hold here: `sluice submit` splits bigger jobs into batches that fit.
            "limits": {
                "max_batch_lines": settings.max_batch_lines,
                "max_batch_file_bytes": settings.max_batch_file_bytes,
                "max_file_bytes": settings.max_file_bytes,
            },
        }
    )


async def history(request: web.Request) -> web.Response:
    """GET /v1/sluice/history?minutes=N: per-minute lines, requests, 429s and latency, cluster-wide and
    by provider, for the last N minutes (default 60, at most 1440); see ``counters.read_history``."""
    raw = request.query.get("minutes")
    minutes = HISTORY_DEFAULT_MINUTES
    if raw is not None:
        try:
            minutes = int(raw)
        except ValueError:
            raise bad_request(
                f"Invalid 'minutes': expected an integer, got '{raw[:64]}'.", param="minutes", code="invalid_type"
            ) from None
        if not 1 <= minutes <= HISTORY_MAX_MINUTES:
            raise bad_request(
                f"Invalid 'minutes': {minutes}. It must be between 1 and {HISTORY_MAX_MINUTES}.",
                param="minutes",
                code="invalid_value",
            )
    settings = request.app[appkeys.SETTINGS]
    return api.json_response(
        await counters.read_history(
            request.app[appkeys.REDIS],
            now=time.time(),
            minutes=minutes,
            providers=tuple(p.name for p in settings.providers),
        )
    )


def add_routes(app: web.Application) -> None:
    """The page and its assets, and the cluster and history endpoints (under /v1 and bare, like the API)."""
    app.router.add_get("/dashboard", _redirect)
    app.router.add_get("/dashboard/", _asset)
    app.router.add_get("/dashboard/{name}", _asset)
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/sluice/cluster", cluster)
        app.router.add_get(f"{prefix}/sluice/history", history)
