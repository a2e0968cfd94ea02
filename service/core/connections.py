"""Redis clients, built the same way in every process."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Settings

# Blocking reads (XREADGROUP BLOCK) must stay well below this, or redis-py calls them timeouts.
SOCKET_TIMEOUT_S = 30.0
BLOCK_MS = 1000


def tls_options(url: str) -> dict[str, Any]:
    """Extra client options for ``url``: a ``rediss://`` URL is not verified unless it asks to be.

    Managed Redis on Heroku-like platforms presents a self-signed certificate that no CA vouches
    for, so by default the connection is encrypted but the server's certificate is not checked
    (``ssl_cert_reqs=none``). A URL that sets ``ssl_cert_reqs`` itself keeps its choice, e.g.
    ``rediss://host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis/ca.pem`` verifies the
    certificate against that CA (and the host name, unless ``ssl_check_hostname=false``).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return {}
    return {"ssl_cert_reqs": "none"}


def connect(settings: Settings, *, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of raising when exhausted.

    Every Sluice process (and ``sluice tokens``) builds its clients here, so ``rediss://``
    works the same everywhere (see :func:`tls_options`).
    """
    kwargs = tls_options(settings.redis_url)
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


class Script:
    """A Lua script run by its SHA1 (EVALSHA), so Redis need not receive and hash it on every call."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, r: aioredis.Redis, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        """Run the script; the first call after Redis started sends its source once."""
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # EVAL runs it and caches it under the same SHA for the next calls.
            return await r.eval(self.source, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any] = ()) -> None:
        """Add a call to a pipeline; if it fails with NoScriptError, ``load`` and execute again."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, r: aioredis.Redis) -> None:
        """Make sure Redis has the script (after a restart wiped its script cache)."""
        await r.script_load(self.source)


# What a lost or restarting Redis raises (BusyLoadingError while it replays its AOF is a
# ConnectionError); every loop treats these as "wait and carry on".
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class Outage:
    """Logs a Redis outage once when it starts and once when it ends; paces reconnect attempts."""

    def __init__(self, log: "structlog.typing.FilteringBoundLogger") -> None:
        self.log = log
        self.since: float | None = None
        self.delay = 0.1

    def failed(self, error: BaseException) -> float:
        """Note a failure; return how long to wait before trying again (exponential, capped)."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("redis_unavailable", error=f"{type(error).__name__}: {error}")
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay

    def ok(self) -> None:
        """Note a success; logs the recovery after an outage."""
        if self.since is not None:
            self.log.info("redis_reconnected", down_s=round(time.monotonic() - self.since, 1))
            self.since = None
            self.delay = 0.1
