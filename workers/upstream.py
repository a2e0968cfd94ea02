"""Calling the OpenAI-compatible provider for one request line, with retries."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Mapping

import aiohttp
import msgspec
from structlog.typing import FilteringBoundLogger

from service.core import usage
from service.core.config import Provider, Settings
from service.core.counters import Attempts
from service.core.heartbeat import Tally
from service.core.results import error_line, json_body, response_line
from service.core.store import Outcome

from .limits import CONGESTED, NO_SIGNAL, OK, Limiter

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# Answers that say the provider has no room: they shrink its adaptive concurrency window (a timeout too).
CONGESTION_STATUS = frozenset({429, 503})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
MAX_RETRY_AFTER_S = 120.0


@dataclass(frozen=True)
class CallResult:
    """What one request line ended with: the counter it moves and its result-file line."""

    outcome: str
    line: bytes
    attempts: int
    usage: str = ""  # tokens of a successful answer (service/core/usage.py)


def upstream_url(base: str, endpoint: str) -> str:
    """Join the provider base URL and a batch endpoint (``/v1/...``) without doubling ``/v1``."""
    base = base.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        return base + endpoint[3:]
    return base + endpoint


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_s(attempt: int, retry_after: float | None) -> float:
    """Wait before the next attempt: the provider's Retry-After, else exponential with full jitter."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


class Upstream:
    """Sends request lines to their providers, through the limiter shared by all workers."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        limiter: Limiter,
        tally: Tally | None = None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.limiter = limiter
        self.tally = tally if tally is not None else Tally()

    async def call(
        self,
        provider: Provider,
        endpoint: str,
        custom_id: str,
        body: bytes,
        *,
        api_key: str,
        holder: str,
        cost: int,
        log: FilteringBoundLogger,
        attempts: Attempts | None = None,
    ) -> CallResult:
        """Send one request; retry transient failures; return the final result line.

        ``api_key`` is the provider's key, or the client's own for a BYOK batch. Every attempt
        is noted in ``attempts`` (status, latency, whether it paused the provider), which the
        worker records with the line's result: the cluster's upstream counters count it then.
        """
        if attempts is None:
            attempts = Attempts(provider.name)
        url = upstream_url(provider.base_url, endpoint)
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = aiohttp.ClientTimeout(total=provider.timeout_s)
        max_attempts = self.settings.max_attempts
        tally = self.tally
        for attempt in range(1, max_attempts + 1):
            async with self.limiter.slot(provider, holder, cost) as ticket:
                tally.started(provider.name)
                started = time.perf_counter()
                label = "aborted"  # cancelled at shutdown, or a bug
                try:
                    async with self.session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                        data = await resp.read()
                        status = resp.status
                        label = str(status)
                        request_id = resp.headers.get("x-request-id") or f"req_{secrets.token_hex(12)}"
                        retry_after = _retry_after(resp.headers)
                    ticket.outcome = CONGESTED if status in CONGESTION_STATUS else OK
                except asyncio.TimeoutError:
                    label = "timeout"
                    ticket.outcome = CONGESTED
                    result = CallResult(
                        Outcome.FAILED,
                        error_line(
                            custom_id,
                            "request_timeout",
                            f"The request to the provider timed out after {provider.timeout_s:g} s.",
                        ),
                        attempt,
                    )
                    status, retry_after = None, None
                except aiohttp.ClientError as e:
                    label = "connection_error"
                    ticket.outcome = NO_SIGNAL
                    result = CallResult(
                        Outcome.FAILED,
                        error_line(
                            custom_id,
                            "upstream_connection_error",
                            f"Could not reach the provider: {type(e).__name__}: {e}",
                        ),
                        attempt,
                    )
                    status, retry_after = None, None
                else:
                    result = self._answer(custom_id, resp.status, request_id, data, attempt, provider.name)
                    if status not in RETRYABLE_STATUS:
                        return result
                finally:
                    tally.ended(provider.name)
                    attempts.add(label, time.perf_counter() - started, time.time_ns() if attempts.timed else 0)
            # An adaptive provider's window already shrank for a 429 without Retry-After: only this line
            # backs off. With Retry-After (or without adaptive concurrency) every worker pauses, as asked.
            paused = status == 429 and (retry_after is not None or not provider.is_adaptive)
            if paused and await self.limiter.pause(provider, retry_after or 1.0):
                attempts.paused()
                log.warning("provider_paused", provider=provider.name, attempt=attempt, seconds=retry_after or 1.0)
            if attempt < max_attempts:
                # After a pause the provider's pause holds every worker back: no extra sleep here.
                delay = 0.0 if paused else backoff_s(attempt, retry_after)
                log.info(
                    "upstream_retry", provider=provider.name, attempt=attempt, status=status, delay_s=round(delay, 3)
                )
                await asyncio.sleep(delay)
        log.warning("upstream_gave_up", provider=provider.name, attempt=attempt, attempts=max_attempts, status=status)
        return result

    @staticmethod
    def _answer(custom_id: str, status: int, request_id: str, data: bytes, attempt: int, provider: str) -> CallResult:
        body = json_body(data)
        if body is None:
            text = data[:2000].decode("utf-8", "replace")
            body = msgspec.Raw(
                msgspec.json.encode(
                    {
                        "error": {
                            "message": f"The provider answered with a body that is not JSON: {text}",
                            "type": "invalid_upstream_response",
                            "param": None,
                            "code": None,
                        }
                    }
                )
            )
            ok = False
        else:
            ok = 200 <= status < 300
        return CallResult(
            Outcome.COMPLETED if ok else Outcome.FAILED,
            response_line(custom_id, status, request_id, body),
            attempt,
            usage.from_body(provider, data) if ok else "",
        )
