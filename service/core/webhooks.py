"""Completion webhooks: a signed POST to the URL a batch was created with, once it has ended.

A client names the URL at creation (header ``x-sluice-webhook-url``); it is kept in the batch
hash. The script that moves the batch to a terminal state (``store.transition``) adds the batch
to ``keys.WEBHOOKS_DUE`` in the same step, so the delivery is queued exactly once and survives
any process dying. The active finalizer sends what is due (:class:`WebhookSender`), in a task of
its own so a slow receiver never holds finalization up, and removes the entry once a 2xx came back.
Failures (network errors, timeouts, any other status) are retried with exponential backoff,
``webhook_backoff_s`` × 2^(attempt-1), up to ``webhook_max_attempts`` attempts: delivery is at
least once, so receivers deduplicate on ``webhook-id``.

Signing follows the Standard Webhooks specification (the scheme OpenAI's webhooks use):
``webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import structlog
from yarl import URL

from . import keys, store
from .config import Settings, webhook_key
from .connections import Script
from .errors import bad_request
from .wire import TERMINAL_STATUSES, json_encoder

log = structlog.get_logger("sluice.webhooks")

HEADER = "x-sluice-webhook-url"
MAX_URL_LENGTH = 2048
# Deliveries sent at once by one finalizer pass.
BATCH_SIZE = 32
USER_AGENT = "Sluice-Webhooks/1"


def check_url(raw: str) -> str | None:
    """The problem with a webhook URL a client gave, or None when it is acceptable."""
    if len(raw) > MAX_URL_LENGTH:
        return f"it is longer than {MAX_URL_LENGTH} characters"
    if any(ch.isspace() or not ch.isprintable() for ch in raw):
        return "it contains whitespace or control characters"
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        return "it is not a valid URL"
    if url.scheme not in ("http", "https") or not url.is_absolute():
        return "it must be an absolute http:// or https:// URL"
    if not url.host:
        return "it has no host"
    if url.fragment:
        return "it must not have a fragment"
    return None


def url_from_header(value: str | None, settings: Settings) -> str:
    """The webhook URL a create request asked for in ``x-sluice-webhook-url`` ("" for none), or a 400."""
    raw = (value or "").strip()
    if not raw:
        return ""
    problem = check_url(raw)
    if problem:
        raise bad_request(f"Invalid {HEADER}: {problem}.", param=HEADER, code="invalid_value")
    if not settings.webhook_secret:
        raise bad_request("This server cannot sign webhooks: set SLUICE_WEBHOOK_SECRET or SLUICE_SECRET_KEY.",
                          param=HEADER, code="webhooks_unavailable")
    return raw


def where(url: str) -> str:
    """What a log line may say about a webhook URL: scheme, host and port (no path, query or credentials)."""
    try:
        u = URL(url)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (ValueError, TypeError):
        return "?"


def message_id(batch_id: str) -> str:
    """The ``webhook-id`` of a batch's completion webhook: the same on every retry."""
    return f"msg_{batch_id}"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(webhook_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def payload(h: dict[str, str]) -> bytes:
    """The JSON body announcing that the batch in hash ``h`` ended."""
    batch = store.batch_from_record(h)
    at = getattr(batch, f"{batch.status}_at", None) or store.now()
    return json_encoder.encode({
        "id": message_id(h["id"]), "object": "event", "type": f"batch.{batch.status}", "created_at": at,
        "data": batch,
    })


# Count an attempt on the batch record, unless the record is gone (no key without a TTL is made).
# ARGV[1]: the attempts counted when the record was read. Only that value is bumped, so a re-run of
# the script (redis-py re-sending it after a lost reply) answers the same number without counting
# the attempt twice.
_BUMP = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local counted = tonumber(redis.call('HGET', KEYS[1], 'webhook_attempts') or '0')
if counted ~= tonumber(ARGV[1]) then return counted end
return redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
""")

# The delivery is over (ARGV[2]: delivered or failed): note it on the record, if any, and unqueue it.
_DONE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'webhook_state', ARGV[2]) end
redis.call('ZREM', KEYS[2], ARGV[1])
""")


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return settings.webhook_backoff_s * 2 ** (attempt - 1)


class WebhookSender:
    """Sends the due webhooks; ``start_pass`` runs one pass in the background unless one still runs."""

    def __init__(self, r: store.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None

    def start_pass(self) -> None:
        """Start a delivery pass unless the previous one is still under way (never waits)."""
        if self.task is not None and not self.task.done():
            return
        if self.task is not None and not self.task.cancelled() and (e := self.task.exception()) is not None:
            log.warning("webhook_pass_failed", error=f"{type(e).__name__}: {e}")
        self.task = asyncio.create_task(self.run_pass(), name="webhooks")

    async def aclose(self) -> None:
        """Stop a pass under way (its deliveries stay queued and are retried) and close the session."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def run_pass(self) -> int:
        """Send every webhook due now; return how many were attempted."""
        now = time.time()
        due = [m.decode() for m in await self.r.zrangebyscore(keys.WEBHOOKS_DUE, "-inf", now, start=0, num=BATCH_SIZE)]
        if not due:
            return 0
        # Claimed for the length of an attempt, so an overlapping pass (or a finalizer taking over)
        # does not send the same delivery at the same time; a dead sender's claim simply runs out.
        lease = now + self.settings.webhook_timeout_s * 2 + 5
        pipe = self.r.pipeline(transaction=False)
        for batch_id in due:
            pipe.zadd(keys.WEBHOOKS_DUE, {batch_id: lease}, xx=True)
        await pipe.execute()
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        results = await asyncio.gather(*(self._deliver(batch_id) for batch_id in due), return_exceptions=True)
        for batch_id, result in zip(due, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                # Its claim runs out and it is tried again (each try counts as an attempt).
                log.error("webhook_error", batch_id=batch_id, error=f"{type(result).__name__}: {result}")
        return len(due)

    async def _deliver(self, batch_id: str) -> None:
        h = await store.get_batch_record(self.r, batch_id)
        if h is None or not h.get("webhook_url") or h.get("status") not in TERMINAL_STATUSES:
            await self.r.zrem(keys.WEBHOOKS_DUE, batch_id)  # the record expired or was deleted meanwhile
            return
        attempt = int(await _BUMP(self.r, [keys.batch(batch_id)], [int(h.get("webhook_attempts") or 0)]))
        if attempt == 0:
            await self.r.zrem(keys.WEBHOOKS_DUE, batch_id)
            return
        url, msg_id = h["webhook_url"], message_id(batch_id)
        body = payload(h)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.settings.webhook_secret, msg_id, timestamp, body),
        }
        bound = log.bind(batch_id=batch_id, webhook_id=msg_id, target=where(url), attempt=attempt,
                         event_type=f"batch.{h['status']}")
        started = time.monotonic()
        outcome: dict[str, Any]
        try:
            assert self.session is not None
            # The answer's body is not read: only its status matters.
            async with self.session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                ok, outcome = 200 <= resp.status < 300, {"status": resp.status}
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            ok, outcome = False, {"error": type(e).__name__}
        outcome["seconds"] = round(time.monotonic() - started, 3)
        if ok:
            await _DONE(self.r, [keys.batch(batch_id), keys.WEBHOOKS_DUE], [batch_id, "delivered"])
            bound.info("webhook_delivered", **outcome)
        elif attempt >= self.settings.webhook_max_attempts:
            await _DONE(self.r, [keys.batch(batch_id), keys.WEBHOOKS_DUE], [batch_id, "failed"])
            bound.warning("webhook_given_up", **outcome)
        else:
            wait = backoff(self.settings, attempt)
            await self.r.zadd(keys.WEBHOOKS_DUE, {batch_id: time.time() + wait}, xx=True)
            bound.info("webhook_retrying", retry_in_s=round(wait, 3), **outcome)
