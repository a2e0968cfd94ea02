"""Configuration: read once from the environment into a typed, immutable object.

Every process builds one ``Settings`` at start-up (``Settings.from_env()``) and passes it
explicitly; nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    """An environment variable holds a value Sluice cannot use."""


MB = 1024 * 1024


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a Sluice process needs to know about its environment."""

    redis_url: str = "redis://localhost:6379/0"
    port: int = 8000
    data_dir: Path = Path("./var/data")
    api_tokens: tuple[str, ...] = ()
    upstream_url: str = ""
    upstream_api_key: str = field(default="", repr=False)
    worker_concurrency: int = 32
    max_attempts: int = 5
    request_timeout_s: float = 600.0
    completion_window_s: int = 24 * 3600
    shutdown_grace_s: float = 20.0
    lease_s: float = 60.0
    max_deliveries: int = 5
    retention_s: int = 30 * 24 * 3600
    max_batch_file_bytes: int = 200 * MB
    max_file_bytes: int = 512 * MB
    max_batch_lines: int = 50_000
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default: ``os.environ``); raise ConfigError on bad values."""
        env = os.environ if env is None else env
        tokens = tuple(t.strip() for t in env.get("SLUICE_API_TOKENS", "").split(",") if t.strip())
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            port=_int(env, "PORT", cls.port, minimum=0),
            data_dir=Path(env.get("SLUICE_DATA_DIR", "").strip() or cls.data_dir),
            api_tokens=tokens,
            upstream_url=env.get("SLUICE_UPSTREAM_URL", "").strip().rstrip("/"),
            upstream_api_key=env.get("SLUICE_UPSTREAM_API_KEY", "").strip(),
            worker_concurrency=_int(env, "SLUICE_WORKER_CONCURRENCY", cls.worker_concurrency, minimum=1),
            max_attempts=_int(env, "SLUICE_MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            request_timeout_s=_float(env, "SLUICE_REQUEST_TIMEOUT_S", cls.request_timeout_s, minimum=0.1),
            completion_window_s=_int(env, "SLUICE_COMPLETION_WINDOW_S", cls.completion_window_s, minimum=1),
            shutdown_grace_s=_float(env, "SLUICE_SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
            lease_s=_float(env, "SLUICE_LEASE_S", cls.lease_s, minimum=1.0),
            max_deliveries=_int(env, "SLUICE_MAX_DELIVERIES", cls.max_deliveries, minimum=1),
            retention_s=_int(env, "SLUICE_RETENTION_S", cls.retention_s, minimum=60),
            max_batch_file_bytes=_int(env, "SLUICE_MAX_BATCH_FILE_BYTES", cls.max_batch_file_bytes, minimum=1),
            max_file_bytes=_int(env, "SLUICE_MAX_FILE_BYTES", cls.max_file_bytes, minimum=1),
            max_batch_lines=_int(env, "SLUICE_MAX_BATCH_LINES", cls.max_batch_lines, minimum=1),
            log_level=env.get("SLUICE_LOG_LEVEL", "").strip().lower() or cls.log_level,
        )
