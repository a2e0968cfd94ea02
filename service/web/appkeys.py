"""The typed keys of what the web app and its requests carry (aiohttp ``AppKey``/``RequestKey``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from service.core.config import Quotas, Settings
from service.core.connections import Outage
from service.core.storage import Storage
from service.core.store import Redis

from .publisher import Publisher

if TYPE_CHECKING:
    from .app import InFlight, StorageCheck

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
STORAGE = web.AppKey("storage", Storage)
PUBLISHER = web.AppKey("publisher", Publisher)
OUTAGE = web.AppKey("outage", Outage)
# Requests under way, so that a stopping process can wait for them (service/web/app.py).
IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight")
# /readyz's storage check, which remembers its last success for a while (service/web/app.py).
STORAGE_CHECK: web.AppKey[StorageCheck] = web.AppKey("storage_check")
# Set when the app shuts down: event streams end at once instead of holding the shutdown.
EVENTS_STOP = web.AppKey("events_stop", asyncio.Event)

# The request's id (x-request-id), set by the outermost middleware for every request (service/web/app.py).
REQUEST_ID = web.RequestKey("request_id", str)
# Who is calling, set by the auth middleware for every authenticated request.
OWNER = web.RequestKey("owner", str)
QUOTAS = web.RequestKey("quotas", Quotas)
