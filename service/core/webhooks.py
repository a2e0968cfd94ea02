"""Completion webhooks: a signed POST to the URL a batch was created with, once it has ended.

A client names the URL at creation (header ``x-sluice-webhook-url``); it is kept in the batch
hash. The script that moves the batch to a terminal state (``store.transition``) adds the batch
to its shard's ``keys.webhooks_due`` in the same step, so the delivery is queued exactly once and
survives any process dying. The finalizer holding a shard's "webhooks" chore lease sends what is
due there (:class:`WebhookSender`), in a task of its own so a slow receiver never holds
finalization up, and removes the entry once a 2xx came back. Every write a pass makes for a shard
is fenced by that shard's lease: a finalizer paused mid-pass and resumed after a peer took the
chore over records nothing more.
Failures (network errors, timeouts, any other status) are retried with exponential backoff,
``webhook_backoff_s`` × 2^(attempt-1), up to ``webhook_max_attempts`` attempts: delivery is at
least once, so receivers deduplicate on ``webhook-id``.

Targets must be public: unless ``SLUICE_WEBHOOK_ALLOW_PRIVATE`` is set, a URL whose host is (or
resolves to) a loopback, private, link-local, unique-local, shared (CGNAT), multicast, unspecified
or otherwise non-public address, or a cloud metadata service, is refused at batch creation
(:func:`url_from_header`), and the sender's connections are checked again after DNS resolution
(:class:`PublicOnlyResolver`, :func:`public_socket`), so a name that later resolves elsewhere (DNS
rebinding) reaches nothing internal either.

Signing follows the Standard Webhooks specification (the scheme OpenAI's webhooks use):
``webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
import time
from typing import Any, Mapping

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import AddrInfoType
from aiohttp.resolver import DefaultResolver
from yarl import URL

from . import keys, shards, store
from .config import Settings, webhook_key
from .errors import bad_request
from .leases import FencedScript, Lease, LeaseLost, execute
from .records import BatchRecord
from .wire import TERMINAL_STATUSES, json_encoder

log = structlog.get_logger("sluice.webhooks")

HEADER = "x-sluice-webhook-url"
MAX_URL_LENGTH = 2048
# Deliveries sent at once by one finalizer pass.
BATCH_SIZE = 32
USER_AGENT = "Sluice-Webhooks/1"
# How long batch creation waits for the webhook host's name to resolve. A name that does not resolve
# in time is accepted: the check when connecting still applies.
RESOLVE_TIMEOUT_S = 2.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names of cloud metadata services that need not resolve outside their cloud to be refused.
METADATA_HOSTS = frozenset({"metadata.google.internal"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})

# Checked in order: the first match names the reason.
_FORBIDDEN_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private (RFC 1918) address"),
        ("172.16.0.0/12", "a private (RFC 1918) address"),
        ("192.168.0.0/16", "a private (RFC 1918) address"),
        ("169.254.0.0/16", "a link-local address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
        # Python before 3.12 counts this one as global; Oracle Cloud's metadata service is in it.
        ("192.0.0.0/24", "a reserved (IETF protocol assignment) address"),
    )
)
_FORBIDDEN_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fc00::/7", "a unique-local address"),
        ("ff00::/8", "a multicast address"),
    )
)
# IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible).
_EMBEDS_V4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))


def forbidden_reason(ip: IPAddress) -> str | None:
    """What makes ``ip`` an address webhooks must not reach (e.g. "a loopback address"), or None if public."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata service address"
    if isinstance(ip, ipaddress.IPv6Address):
        for net6, why in _FORBIDDEN_V6:
            if ip in net6:
                return why
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _EMBEDS_V4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            return f"{inner} inside an IPv6 address" if inner else None
        return None if ip.is_global else "a non-public address"
    for net, why in _FORBIDDEN_V4:
        if ip in net:
            return why
    return None if ip.is_global else "a non-public address"


def _ipv4_part(label: str) -> int:
    if label[:2].lower() == "0x":
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)
    return int(label, 10)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host spells out, in any form a resolver accepts, or None for a name.

    IPv4 is read as inet_aton and browsers read it: one to four parts, each decimal, octal
    (leading 0) or hex (0x), the last one filling the remaining bytes (``127.1``, ``2130706433``,
    ``0x7f000001``, ``0177.0.0.1``). A host whose last label is a number but that is no valid
    address raises ValueError.
    """
    if ":" in host:
        return ipaddress.IPv6Address(host.split("%", 1)[0])
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # the root's trailing dot
    last = labels[-1].lower()
    if not (last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:]))):
        return None
    if len(labels) > 4:
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    try:
        parts = [_ipv4_part(label) for label in labels]
    except ValueError:
        raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    if any(part > 255 for part in parts[:-1]) or parts[-1] >= 256 ** (5 - len(parts)):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    value = parts[-1]
    for i, part in enumerate(parts[:-1]):
        value += part << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (the system resolver); socket.gaierror when it does not."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [_address(str(info[4][0])) for info in infos]


async def target_problem(raw: str) -> str | None:
    """Why webhooks must not be sent to the (well-formed) URL ``raw``, or None when its host is public."""
    url = URL(raw)
    host = (url.host or "").lower()
    if host.rstrip(".") in METADATA_HOSTS:
        return f"its host {host} is a cloud metadata service"
    try:
        ip = literal_address(host)
    except ValueError as e:
        return str(e)
    if ip is not None:
        why = forbidden_reason(ip)
        spelled = "" if host == str(ip) else f" ({ip})"
        return f"its host {host}{spelled} is {why}" if why else None
    try:
        addresses = await asyncio.wait_for(resolve(host, url.port or 0), RESOLVE_TIMEOUT_S)
    except (asyncio.TimeoutError, OSError):
        # Not resolvable now (a slow or missing DNS, a name not created yet): what it resolves to
        # when a delivery connects is checked then.
        return None
    for ip in addresses:
        why = forbidden_reason(ip)
        if why:
            return f"its host {host} resolves to {ip}, {why}"
    return None


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


async def url_from_header(value: str | None, settings: Settings) -> str:
    """The webhook URL a create request asked for in ``x-sluice-webhook-url`` ("" for none), or a 400.

    Unless ``settings.webhook_allow_private``, a URL whose host is or resolves to a non-public
    address is refused, saying which address and why.
    """
    raw = (value or "").strip()
    if not raw:
        return ""
    problem = check_url(raw)
    if problem:
        raise bad_request(f"Invalid {HEADER}: {problem}.", param=HEADER, code="invalid_value")
    if not settings.webhook_secret:
        raise bad_request(
            "This server cannot sign webhooks: set SLUICE_WEBHOOK_SECRET or SLUICE_SECRET_KEY.",
            param=HEADER,
            code="webhooks_unavailable",
        )
    if not settings.webhook_allow_private and (problem := await target_problem(raw)):
        raise bad_request(
            f"Invalid {HEADER}: {problem}. Webhooks are only sent to public addresses.",
            param=HEADER,
            code="webhook_target_forbidden",
        )
    return raw


class ForbiddenTarget(OSError):
    """A webhook connection refused because the address it would reach is not public."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the public addresses a name resolves to.

    It runs when the sender connects, after the name was checked at batch creation: a name that
    resolves to an internal address by then (DNS rebinding) is refused here.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> list[ResolveResult]:
        """The resolved addresses of ``host`` that are public; ForbiddenTarget if none is."""
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not forbidden_reason(_address(r["host"]))]
        if not public:
            refused = ", ".join(f"{r['host']} ({forbidden_reason(_address(r['host']))})" for r in found)
            raise ForbiddenTarget(f"{host} resolves only to addresses webhooks must not reach: {refused}")
        return public

    async def close(self) -> None:
        """Release the wrapped resolver."""
        await self._inner.close()


def public_socket(addr_info: AddrInfoType) -> socket.socket:
    """The socket for one connection attempt of the sender; ForbiddenTarget for a non-public address.

    The last check, on the very address about to be connected to: it also covers hosts given as
    IP addresses, which aiohttp connects to without asking the resolver.
    """
    family, type_, proto, _, sockaddr = addr_info
    why = forbidden_reason(_address(sockaddr[0]))
    if why:
        raise ForbiddenTarget(f"{sockaddr[0]} is {why}")
    return socket.socket(family=family, type=type_, proto=proto)


def _forbidden(error: BaseException) -> ForbiddenTarget | None:
    """The ForbiddenTarget behind an aiohttp connection error, if that is what it was."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ForbiddenTarget):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


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


def payload(rec: BatchRecord) -> bytes:
    """The JSON body announcing that the batch of record ``rec`` ended."""
    batch = store.batch_from_record(rec)
    at = getattr(batch, f"{batch.status}_at", None) or store.now()
    return json_encoder.encode(
        {
            "id": message_id(rec.id),
            "object": "event",
            "type": f"batch.{batch.status}",
            "created_at": at,
            "data": batch,
        }
    )


# Count an attempt on the batch record, unless the record is gone (no key without a TTL is made).
# counted: the attempts counted when the record was read. Only that value is bumped, so a re-run of
# the script (redis-py re-sending it after a lost reply) answers the same number without counting
# the attempt twice.
_BUMP = FencedScript(
    keys=("batch",),
    args=("counted",),
    source="""
if redis.call('EXISTS', KEYS.batch) == 0 then return 0 end
local counted = tonumber(redis.call('HGET', KEYS.batch, 'webhook_attempts') or '0')
if counted ~= tonumber(ARGV.counted) then return counted end
return redis.call('HINCRBY', KEYS.batch, 'webhook_attempts', 1)
""",
)

# The delivery is over (state: delivered, failed or refused): note it on the record, if any, and unqueue it.
_DONE = FencedScript(
    keys=("batch", "webhooks_due"),
    args=("batch_id", "state"),
    source="""
if redis.call('EXISTS', KEYS.batch) == 1 then redis.call('HSET', KEYS.batch, 'webhook_state', ARGV.state) end
redis.call('ZREM', KEYS.webhooks_due, ARGV.batch_id)
""",
)


def _key(lease: Lease | None) -> str:
    return lease.key if lease is not None else ""


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return settings.webhook_backoff_s * 2.0 ** (attempt - 1)


class WebhookSender:
    """Sends the due webhooks; ``start_pass`` runs one pass in the background unless one still runs."""

    def __init__(self, r: store.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self.resolver: PublicOnlyResolver | None = None
        self.task: asyncio.Task[int] | None = None

    def start_pass(self, held: Mapping[int, Lease] | None = None) -> None:
        """Start a delivery pass (see :meth:`run_pass`) unless the previous one is still under way."""
        if self.task is not None and not self.task.done():
            return
        if self.task is not None and not self.task.cancelled() and (e := self.task.exception()) is not None:
            log.warning("webhook_pass_failed", error=f"{type(e).__name__}: {e}")
        self.task = asyncio.create_task(self.run_pass(dict(held) if held is not None else None), name="webhooks")

    async def aclose(self) -> None:
        """Stop a pass under way (its deliveries stay queued and are retried) and close the session."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        if self.resolver is not None:
            await self.resolver.close()  # the connector does not close a resolver it was given

    async def run_pass(self, held: Mapping[int, Lease] | None = None) -> int:
        """Send every webhook due now in the shards of ``held`` (the "webhooks" lease held for each),
        or in every shard, unfenced, when None; return how many were attempted.

        Every write made for a shard is refused once its lease is lost: the pass stops sending for
        that shard, logging ``fenced_write_refused``, and the lease's new holder retries what is left.
        """
        fences: dict[int, Lease | None] = dict(held) if held is not None else dict.fromkeys(range(keys.SHARDS))
        now = time.time()
        due = await shards.due(self.r, keys.webhooks_due, now, BATCH_SIZE, shards=list(fences))
        if not due:
            return 0
        # Claimed for the length of an attempt, so an overlapping pass (or a finalizer taking over)
        # does not send the same delivery at the same time; a dead sender's claim simply runs out.
        claimed_until = now + self.settings.webhook_timeout_s * 2 + 5
        by_shard: dict[int, list[str]] = {}
        for batch_id, shard in due:
            by_shard.setdefault(shard, []).append(batch_id)
        claims = await asyncio.gather(
            *(
                execute(
                    self.r, fences[shard], *(("ZADD", keys.webhooks_due(shard), "XX", claimed_until, b) for b in ids)
                )
                for shard, ids in by_shard.items()
            ),
            return_exceptions=True,
        )
        claimed: list[tuple[str, Lease | None]] = []
        for (shard, ids), claim in zip(by_shard.items(), claims):
            if isinstance(claim, LeaseLost):
                log.warning("fenced_write_refused", lease=_key(fences[shard]), error=str(claim))
            elif isinstance(claim, BaseException):
                raise claim
            else:
                claimed += [(batch_id, fences[shard]) for batch_id in ids]
        if self.session is None:
            connector = None
            if not self.settings.webhook_allow_private:
                self.resolver = PublicOnlyResolver()
                connector = aiohttp.TCPConnector(resolver=self.resolver, socket_factory=public_socket)
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        results = await asyncio.gather(
            *(self._deliver(batch_id, lease) for batch_id, lease in claimed), return_exceptions=True
        )
        refused: set[str] = set()
        for (batch_id, lease), result in zip(claimed, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, LeaseLost):
                # Paused past the lease: its new holder retries this shard's deliveries.
                if _key(lease) not in refused:
                    refused.add(_key(lease))
                    log.warning("fenced_write_refused", lease=_key(lease), error=str(result))
            elif isinstance(result, BaseException):
                # Its claim runs out and it is tried again (each try counts as an attempt).
                log.error("webhook_error", batch_id=batch_id, error=f"{type(result).__name__}: {result}")
        return len(claimed)

    async def _deliver(self, batch_id: str, lease: Lease | None) -> None:
        due = keys.webhooks_due(keys.shard_of(batch_id))
        h = await store.get_batch_record(self.r, batch_id)
        if h is None or not h.webhook_url or h.status not in TERMINAL_STATUSES:
            # The record expired or was deleted meanwhile.
            await execute(self.r, lease, ("ZREM", due, batch_id))
            return
        attempt = int(await _BUMP(self.r, batch=keys.batch(batch_id), counted=h.webhook_attempts, lease=lease))
        if attempt == 0:
            await execute(self.r, lease, ("ZREM", due, batch_id))
            return
        url, msg_id = h.webhook_url, message_id(batch_id)
        body = payload(h)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.settings.webhook_secret, msg_id, timestamp, body),
        }
        bound = log.bind(
            batch_id=batch_id, webhook_id=msg_id, target=where(url), attempt=attempt, event_type=f"batch.{h.status}"
        )
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
            if refused := _forbidden(e):
                # Not retried: the target is internal (its name now resolves there, or the URL came
                # from before targets were checked).
                await _DONE(
                    self.r,
                    batch=keys.batch(batch_id),
                    webhooks_due=due,
                    batch_id=batch_id,
                    state="refused",
                    lease=lease,
                )
                bound.warning("webhook_refused", reason=str(refused))
                return
        outcome["seconds"] = round(time.monotonic() - started, 3)
        if ok:
            await _DONE(
                self.r,
                batch=keys.batch(batch_id),
                webhooks_due=due,
                batch_id=batch_id,
                state="delivered",
                lease=lease,
            )
            bound.info("webhook_delivered", **outcome)
        elif attempt >= self.settings.webhook_max_attempts:
            await _DONE(
                self.r,
                batch=keys.batch(batch_id),
                webhooks_due=due,
                batch_id=batch_id,
                state="failed",
                lease=lease,
            )
            bound.warning("webhook_given_up", **outcome)
        else:
            wait = backoff(self.settings, attempt)
            await execute(self.r, lease, ("ZADD", due, "XX", time.time() + wait, batch_id))
            bound.info("webhook_retrying", retry_in_s=round(wait, 3), **outcome)
