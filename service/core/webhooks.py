"""Completion webhooks: a signed POST to the URL a batch was created with, once it has ended.

A client names the URL at creation (header ``x-sluice-webhook-url``); it is kept in the batch
hash. The script that moves the batch to a terminal state (``store.transition``) adds the batch
to ``keys.WEBHOOKS_DUE`` in the same step, so the delivery is queued exactly once and survives
any process dying. The finalizer holding the "webhooks" chore lease sends what is due
(:class:`WebhookSender`), in a task of its own so a slow receiver never holds finalization up, and
removes the entry once a 2xx came back. Every write a pass makes is fenced by that lease: a
finalizer paused mid-pass and resumed after a peer took the chore over records nothing more.
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
from .errors import bad_request
from .leases import FencedScript, Lease, LeaseLost, execute
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
_BUMP = FencedScript("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
""")

# The delivery is over (ARGV[2]: delivered or failed): note it on the record, if any, and unqueue it.
_DONE = FencedScript("""
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
        self.lease: Lease | None = None

    def start_pass(self, lease: Lease | None = None) -> None:
        """Start a delivery pass, fenced by ``lease``, unless the previous one is still under way."""
        if self.task is not None and not self.task.done():
            return
        if self.task is not None and not self.task.cancelled() and (e := self.task.exception()) is not None:
            log.warning("webhook_pass_failed", error=f"{type(e).__name__}: {e}")
        self.task = asyncio.create_task(self.run_pass(lease), name="webhooks")

    async def aclose(self) -> None:
        """Stop a pass under way (its deliveries stay queued and are retried) and close the session."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def run_pass(self, lease: Lease | None = None) -> int:
        """Send every webhook due now; return how many were attempted.

        With ``lease``, every write is refused once it is lost: the pass stops there, logging
        ``fenced_write_refused``, and the holder of the lease now retries what is left.
        """
        self.lease = lease
        try:
            return await self._pass()
        except LeaseLost as e:
            log.warning("fenced_write_refused", lease=lease.key if lease else "", error=str(e))
            return 0

    async def _pass(self) -> int:
        now = time.time()
        due = [m.decode() for m in await self.r.zrangebyscore(keys.WEBHOOKS_DUE, "-inf", now, start=0, num=BATCH_SIZE)]
        if not due:
            return 0
        # Claimed for the length of an attempt, so an overlapping pass (or a finalizer taking over)
        # does not send the same delivery at the same time; a dead sender's claim simply runs out.
        claimed_until = now + self.settings.webhook_timeout_s * 2 + 5
        await execute(self.r, self.lease, *(("ZADD", keys.WEBHOOKS_DUE, "XX", claimed_until, b) for b in due))
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        results = await asyncio.gather(*(self._deliver(batch_id) for batch_id in due), return_exceptions=True)
        for batch_id, result in zip(due, results):
            if isinstance(result, (asyncio.CancelledError, LeaseLost)):
                raise result
            if isinstance(result, BaseException):
                # Its claim runs out and it is tried again (each try counts as an attempt).
                log.error("webhook_error", batch_id=batch_id, error=f"{type(result).__name__}: {result}")
        return len(due)

    async def _deliver(self, batch_id: str) -> None:
        h = await store.get_batch_record(self.r, batch_id)
        if h is None or not h.get("webhook_url") or h.get("status") not in TERMINAL_STATUSES:
            # The record expired or was deleted meanwhile.
            await execute(self.r, self.lease, ("ZREM", keys.WEBHOOKS_DUE, batch_id))
            return
        attempt = int(await _BUMP(self.r, [keys.batch(batch_id)], lease=self.lease))
        if attempt == 0:
            await execute(self.r, self.lease, ("ZREM", keys.WEBHOOKS_DUE, batch_id))
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
            await _DONE(self.r, [keys.batch(batch_id), keys.WEBHOOKS_DUE], [batch_id, "delivered"], lease=self.lease)
            bound.info("webhook_delivered", **outcome)
        elif attempt >= self.settings.webhook_max_attempts:
            await _DONE(self.r, [keys.batch(batch_id), keys.WEBHOOKS_DUE], [batch_id, "failed"], lease=self.lease)
            bound.warning("webhook_given_up", **outcome)
        else:
            wait = backoff(self.settings, attempt)
            await execute(self.r, self.lease, ("ZADD", keys.WEBHOOKS_DUE, "XX", time.time() + wait, batch_id))
            bound.info("webhook_retrying", retry_in_s=round(wait, 3), **outcome)
