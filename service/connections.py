"""Redis clients, built the same way in every process."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from .config import Settings

# Blocking reads (XREADGROUP BLOCK) must stay well below this, or redis-py calls them timeouts.
SOCKET_TIMEOUT_S = 30.0
BLOCK_MS = 1000


def connect(settings: Settings, *, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of raising when exhausted."""
    kwargs = {}
    if settings.redis_url.startswith("rediss://"):
        # Managed Redis on Heroku-like platforms presents a self-signed certificate.
        kwargs["ssl_cert_reqs"] = "none"
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=None,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **kwargs,
    )
    return aioredis.Redis(connection_pool=pool)
