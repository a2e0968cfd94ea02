"""API tokens managed at run time (``sluice tokens``), stored only as SHA-256 digests.

Static tokens from ``SLUICE_API_TOKENS`` keep working beside them; both map to the same kind
of owner id (a prefix of the digest), so a token's files and batches are found either way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import msgspec

from . import keys, store
from .config import Quotas, Settings


class TokenRecord(msgspec.Struct, kw_only=True):
    """What is kept of a managed token: never the token itself."""

    name: str
    created_at: int
    quotas: Quotas | None = None


def digest(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


async def create(r: store.Redis, name: str, quotas: Quotas | None) -> str:
    """Create a token called ``name``; return the token (shown once, stored only as a digest)."""
    token = f"sk-sluice-{secrets.token_urlsafe(32)}"
    d = digest(token)
    record = msgspec.json.encode(TokenRecord(name=name, created_at=store.now(), quotas=quotas))
    if not await r.hsetnx(keys.TOKEN_NAMES, name, d):
        raise ValueError(f"a token named {name!r} exists already")
    await r.hset(keys.TOKENS, d, record)
    return token


async def revoke(r: store.Redis, name: str) -> bool:
    """Remove the token called ``name``; False when there is none."""
    d = await r.hget(keys.TOKEN_NAMES, name)
    if d is None:
        return False
    p = r.pipeline(transaction=True)
    p.hdel(keys.TOKENS, d)
    p.hdel(keys.TOKEN_NAMES, name)
    await p.execute()
    return True


async def list_tokens(r: store.Redis) -> list[tuple[str, TokenRecord]]:
    """Every managed token's id (a digest prefix, safe to show) and record, by name."""
    rows = [
        (d.decode()[:12], msgspec.json.decode(v, type=TokenRecord)) for d, v in (await r.hgetall(keys.TOKENS)).items()
    ]
    return sorted(rows, key=lambda row: row[1].name)


class TokenAuth:
    """Resolves a presented bearer token to (owner id, quotas), or None.

    Static tokens are compared in constant time against their digests in memory; managed ones
    are looked up by digest in Redis, cached for ``CACHE_S`` so a revocation takes effect
    within that time.
    """

    CACHE_S = 5.0

    def __init__(self, settings: Settings, r: store.Redis) -> None:
        self.static = [digest(t) for t in settings.api_tokens]
        self.default_quotas = settings.quotas
        self.redis = r
        self.cache: dict[str, tuple[float, tuple[str, Quotas] | None]] = {}

    async def resolve(self, token: str) -> tuple[str, Quotas] | None:
        """The owner and quotas of ``token`` if it is valid."""
        d = digest(token)
        if any(hmac.compare_digest(d, s) for s in self.static):
            return store.owner_of(token), self.default_quotas
        cached = self.cache.get(d)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        raw = await self.redis.hget(keys.TOKENS, d)
        result = None
        if raw is not None:
            record = msgspec.json.decode(raw, type=TokenRecord)
            result = (store.owner_of(token), record.quotas or self.default_quotas)
        if len(self.cache) > 10_000:
            self.cache.clear()  # bounded: garbage tokens must not grow memory
        self.cache[d] = (now + self.CACHE_S, result)
        return result
