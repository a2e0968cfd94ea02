"""Configuration: read once from the environment into a typed, immutable object.

Every process builds one ``Settings`` at start-up (``Settings.from_env()``) and passes it
explicitly; nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import hmac
import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Mapping, cast

import msgspec
from msgspec import Meta


class ConfigError(ValueError):
    """An environment variable holds a value Sluice cannot use."""


MB = 1024 * 1024
# Even huge lines get a window deep enough to keep a few workers busy.
MIN_WINDOW_LINES = 64
# How long a provider's concurrency ramps back up after a 429 pause (workers/limits.py); the
# cluster view (core/cluster.py) reports a provider as ramping for as long.
RAMP_S = 5.0


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    # NaN compares false with everything, so it would slip through the bounds: refuse it.
    if value != value or value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {'/'.join(choices)}, got {raw!r}")
    return raw


# SLUICE_REDIS_CLUSTER: whether REDIS_URL names a node of a Redis Cluster (connections.connect).
RedisClusterMode = Literal["auto", "on", "off"]
REDIS_CLUSTER_MODES: tuple[RedisClusterMode, ...] = ("auto", "on", "off")


# What a provider's own Batch API takes in one batch, unless its configuration says otherwise.
PROVIDER_BATCH_LINES = 50_000
PROVIDER_BATCH_BYTES = 200 * MB
# OpenAI's only completion window, and the one a provider batch runs within.
DAY_S = 24 * 3600
# Completion windows Sluice accepts ("1h".."168h", "1d".."7d"); OpenAI's own is "24h".
_WINDOW = re.compile(r"^([1-9][0-9]{0,2})([hd])$")
MIN_WINDOW_H = 1
MAX_WINDOW_H = 7 * 24


def window_hours(completion_window: str) -> int | None:
    """The hours a ``completion_window`` names ("6h", "2d", ...), or None when Sluice does not offer it."""
    m = _WINDOW.match(completion_window)
    if m is None:
        return None
    hours = int(m.group(1)) * (24 if m.group(2) == "d" else 1)
    return hours if MIN_WINDOW_H <= hours <= MAX_WINDOW_H else None


def window_seconds(completion_window: str, day_s: int) -> int:
    """How long a batch with this (valid) window runs, when "24h" lasts ``day_s`` (``SLUICE_COMPLETION_WINDOW_S``).

    Every window scales with "24h", so shortening that one for tests shortens them all alike.
    """
    hours = window_hours(completion_window)
    if hours is None:
        raise ValueError(f"not a completion window Sluice offers: {completion_window!r}")
    return max(1, round(hours * day_s / 24))


class Provider(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One OpenAI-compatible upstream and the limits it imposes (global across all workers).

    ``batch_api`` says how Sluice runs the lines routed here: ``execute`` (one real-time request
    per line, by the workers), ``delegate`` (uploaded to the provider's own Files and Batches API,
    by the finalizers: workers/delegate.py) or ``auto`` (delegate when ``has_batch_api`` and the
    batch's completion window fits the provider's 24 h, else execute).
    """

    name: str = ""
    base_url: str
    api_key_env: str | None = None
    api_key: str = ""
    models: tuple[str, ...] = ("*",)
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    timeout_s: float = 600.0
    batch_api: Literal["execute", "delegate", "auto"] = "execute"
    has_batch_api: bool = False
    batch_max_lines: Annotated[int, Meta(ge=1)] = PROVIDER_BATCH_LINES
    batch_max_bytes: Annotated[int, Meta(ge=1024)] = PROVIDER_BATCH_BYTES
    # Polling a provider batch: the first wait, doubled while nothing changes, up to the second.
    batch_poll_s: Annotated[float, Meta(ge=0.05)] = 10.0
    batch_poll_max_s: Annotated[float, Meta(ge=0.05)] = 120.0
    # Delete the provider's copies (input, output and error files) once the results are merged.
    batch_delete_files: bool = True
    # Adaptive concurrency (AIMD, workers/limits.py): the cap on requests in flight, shared by every
    # worker, found from the provider's answers and bounded by max_concurrency (else by the live
    # workers' slots). None: SLUICE_ADAPTIVE_CONCURRENCY decides (on unless set off).
    adaptive: bool | None = None
    # The window is multiplied by this on a 429, a 503 or a timeout (once per window of requests).
    adaptive_decrease: Annotated[float, Meta(ge=0.1, le=0.95)] = 0.7
    # The window a provider starts from (then doubles every round trip until the first cut).
    adaptive_start: Annotated[int, Meta(ge=1)] = 16

    def __repr__(self) -> str:
        # Keys never reach a log line through a repr.
        return f"Provider(name={self.name!r}, base_url={self.base_url!r}, models={self.models!r})"

    @property
    def is_adaptive(self) -> bool:
        """True when this provider's concurrency window adapts to its answers (AIMD)."""
        return self.adaptive is not False

    @property
    def limited(self) -> bool:
        """True when requests to this provider count against limits shared by all workers."""
        return bool(self.max_concurrency or self.rpm or self.tpm or self.is_adaptive)

    def serves(self, model: str) -> bool:
        """True when ``model`` is one of this provider's names or matches one of its patterns."""
        return any(model == m or fnmatch.fnmatchcase(model, m) for m in self.models)

    def delegates(self, completion_window: str, window_s: int) -> bool:
        """Whether a batch with this completion window hands its lines here to the provider's Batch API.

        ``window_s`` is how long the batch itself runs (its window scaled by ``SLUICE_COMPLETION_WINDOW_S``):
        ``auto`` only delegates windows of at least 24 h that really last the provider's 24 h, so
        Sluice does not expire a batch the provider may still legitimately be running.
        """
        if self.batch_api == "delegate":
            return True
        return (
            self.batch_api == "auto"
            and self.has_batch_api
            and (window_hours(completion_window) or 0) >= 24
            and window_s >= DAY_S
        )


class Quotas(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-token limits; tokens created with ``sluice tokens create`` may carry their own."""

    max_active_batches: int = 100
    max_stored_bytes: int = 50 * 1024 * MB
    max_enqueued_lines: int = 2_000_000


class _ConfigFile(msgspec.Struct, forbid_unknown_fields=True):
    providers: dict[str, Provider] = {}
    quotas: Quotas = Quotas()


def load_providers(env: Mapping[str, str]) -> tuple[tuple[Provider, ...], Quotas]:
    """Providers and default quotas from ``$SLUICE_CONFIG`` (TOML) and the single-provider variables.

    A provider's key comes from the environment variable its ``api_key_env`` names, never from
    the file. ``SLUICE_UPSTREAM_URL`` adds a provider named ``default`` serving every model that
    no configured provider serves.
    """
    providers: list[Provider] = []
    quotas = Quotas()
    adaptive = _bool(env, "SLUICE_ADAPTIVE_CONCURRENCY", True)
    path = env.get("SLUICE_CONFIG", "").strip()
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
            parsed = msgspec.convert(raw, type=_ConfigFile)
        except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as e:
            raise ConfigError(f"SLUICE_CONFIG {path}: {e}") from None
        quotas = parsed.quotas
        for name, p in parsed.providers.items():
            if p.batch_poll_max_s < p.batch_poll_s:
                raise ConfigError(
                    f"SLUICE_CONFIG {path}: provider {name!r}: batch_poll_max_s ({p.batch_poll_max_s:g}) "
                    f"is below batch_poll_s ({p.batch_poll_s:g})"
                )
            key = ""
            if p.api_key_env:
                key = env.get(p.api_key_env, "")
                if not key:
                    raise ConfigError(f"provider {name!r}: environment variable {p.api_key_env} is empty")
            providers.append(
                msgspec.structs.replace(
                    p,
                    name=name,
                    api_key=key,
                    base_url=p.base_url.rstrip("/"),
                    adaptive=adaptive if p.adaptive is None else p.adaptive,
                )
            )
    upstream = env.get("SLUICE_UPSTREAM_URL", "").strip().rstrip("/")
    if upstream:
        if any(p.name == "default" for p in providers):
            raise ConfigError("SLUICE_UPSTREAM_URL adds a provider named 'default'; the config file has one too")
        providers.append(
            Provider(
                name="default",
                base_url=upstream,
                models=("*",),
                api_key=env.get("SLUICE_UPSTREAM_API_KEY", "").strip(),
                timeout_s=_float(env, "SLUICE_REQUEST_TIMEOUT_S", 600.0, minimum=0.1),
                adaptive=adaptive,
            )
        )
    return tuple(providers), quotas


def route(providers: tuple[Provider, ...], model: str) -> Provider | None:
    """The provider that serves ``model``: an exact name wins over a pattern, earlier over later."""
    for p in providers:
        if model in p.models:
            return p
    for p in providers:
        if p.serves(model):
            return p
    return None


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """Where file contents live in an S3-compatible object store (``SLUICE_STORAGE_URL=s3://...``).

    Credentials are not kept here: botocore reads them itself (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles, instance roles).
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str = ""  # empty: AWS S3 itself
    region: str = ""  # empty: botocore's default


def parse_storage(env: Mapping[str, str]) -> S3Location | None:
    """The object store ``SLUICE_STORAGE_URL`` names, or None for a local directory (the default)."""
    raw = env.get("SLUICE_STORAGE_URL", "").strip()
    if not raw:
        return None
    # A URL with credentials in it must not be echoed into a log line.
    shown = repr(raw) if "@" not in raw else "(a URL with credentials in it)"
    usage = "SLUICE_STORAGE_URL must be empty (files in SLUICE_DATA_DIR) or s3://BUCKET[/PREFIX]"
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ConfigError(f"{usage}, got {shown}")
    if "@" in rest or "?" in rest or "#" in rest:
        raise ConfigError(
            f"{usage} (credentials go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, options in "
            f"their own variables), got {shown}"
        )
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"{usage}: {bucket!r} is not a valid bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
        )
    prefix = "/".join(seg for seg in prefix.split("/") if seg)
    endpoint = next(
        (
            env[n].strip()
            for n in ("SLUICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
            if env.get(n, "").strip()
        ),
        "",
    )
    if endpoint and not endpoint.lower().startswith(("http://", "https://")):
        raise ConfigError(f"the S3 endpoint must be an http:// or https:// URL, got {endpoint!r}")
    region = env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip()
    # aiobotocore is an optional extra: say so at start-up rather than at the first upload.
    if importlib.util.find_spec("aiobotocore") is None:
        raise ConfigError(
            "SLUICE_STORAGE_URL names an S3 bucket, but S3 storage needs the s3 extra: pip install 'sluice[s3]'"
        )
    return S3Location(bucket=bucket, prefix=prefix, endpoint_url=endpoint.rstrip("/"), region=region)


OTLP_PROTOCOL = "http/protobuf"


def otel_traces_endpoint(env: Mapping[str, str]) -> str:
    """Where traces go (OTLP over HTTP), from the standard OpenTelemetry variables; "" when tracing is off.

    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as it is; otherwise ``/v1/traces`` is appended
    to ``OTEL_EXPORTER_OTLP_ENDPOINT``, as the OpenTelemetry specification says. Neither set, or
    ``OTEL_SDK_DISABLED=true``: tracing is off (and the opentelemetry packages are never imported).
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    endpoint = ""
    for name, suffix in (("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""), ("OTEL_EXPORTER_OTLP_ENDPOINT", "/v1/traces")):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        if not raw.lower().startswith(("http://", "https://")):
            raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
        endpoint = raw.rstrip("/") + suffix if suffix else raw
        break
    if endpoint:
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(name, "").strip()
            if protocol and protocol != OTLP_PROTOCOL:
                raise ConfigError(
                    f"{name}: Sluice exports traces with OTLP over HTTP ({OTLP_PROTOCOL}), got {protocol!r}"
                )
    return endpoint


def derive_webhook_secret(secret_key: str) -> str:
    """The webhook signing secret derived from ``SLUICE_SECRET_KEY`` (``whsec_`` + base64 of 32 bytes)."""
    digest = hmac.new(secret_key.encode(), b"sluice webhook signing secret v1", hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: a ``whsec_<base64>`` secret is decoded, any other is its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :], validate=True)
    return secret.encode()


def webhook_secret(env: Mapping[str, str]) -> str:
    """``SLUICE_WEBHOOK_SECRET``, else one derived from ``SLUICE_SECRET_KEY``, else empty (no webhooks)."""
    secret = env.get("SLUICE_WEBHOOK_SECRET", "").strip()
    if secret:
        try:
            if not webhook_key(secret):
                raise ValueError
        except ValueError:
            raise ConfigError("SLUICE_WEBHOOK_SECRET: a whsec_ secret must be followed by non-empty base64") from None
        return secret
    key = env.get("SLUICE_SECRET_KEY", "").strip()
    return derive_webhook_secret(key) if key else ""


DEFAULT_DATA_DIR = Path("./var/data")


@dataclass(frozen=True)
class ClientSettings:
    """What the command-line tools (the API client, ``status``, ``tokens``, ``up``) read from the environment.

    An empty string means "not set": the tools then fall back to the connection file of the
    ``sluice up`` stack (service/cli/localstack.py), and only then to the defaults, so they
    must know whether a value was given rather than get a default here.
    """

    url: str = ""  # SLUICE_URL: the API's web root, with or without /v1
    token: str = field(default="", repr=False)  # SLUICE_TOKEN
    redis_url: str = ""  # REDIS_URL
    data_dir: Path = DEFAULT_DATA_DIR  # SLUICE_DATA_DIR, where `sluice up` keeps its files
    data_dir_set: bool = False  # SLUICE_DATA_DIR was given (else the checkout's var/data is looked at too)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClientSettings":
        """Read the client-side variables from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        data_dir = env.get("SLUICE_DATA_DIR", "").strip()
        return cls(
            url=env.get("SLUICE_URL", "").strip(),
            token=env.get("SLUICE_TOKEN", "").strip(),
            redis_url=env.get("REDIS_URL", "").strip(),
            data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR,
            data_dir_set=bool(data_dir),
        )


def child_environment() -> dict[str, str]:
    """A copy of this process's environment, for ``sluice up`` to hand its children (plus its own settings)."""
    return dict(os.environ)


@dataclass(frozen=True)
class Settings:
    """Everything a Sluice process needs to know about its environment."""

    redis_url: str = "redis://localhost:6379/0"
    # "auto": ask the node REDIS_URL names (INFO cluster) on the first command; "on"/"off" skip the question.
    redis_cluster: RedisClusterMode = "auto"
    port: int = 8000
    data_dir: Path = DEFAULT_DATA_DIR
    api_tokens: tuple[str, ...] = ()
    worker_concurrency: int = 32
    max_attempts: int = 5
    completion_window_s: int = 24 * 3600
    shutdown_grace_s: float = 20.0
    lease_s: float = 60.0
    max_deliveries: int = 5
    retention_s: int = 30 * 24 * 3600
    max_batch_file_bytes: int = 200 * MB
    max_file_bytes: int = 512 * MB
    max_batch_lines: int = 50_000
    window_lines: int = 10_000
    window_bytes: int = 16 * MB
    log_level: str = "info"
    providers: tuple[Provider, ...] = ()
    quotas: Quotas = Quotas()
    secret_key: str = field(default="", repr=False)
    metrics_token: str = field(default="", repr=False)
    s3: S3Location | None = None  # None: file contents in data_dir
    # Completion webhooks (service/core/webhooks.py): the signing secret (SLUICE_WEBHOOK_SECRET, else
    # derived from SLUICE_SECRET_KEY; empty: webhooks are refused), and the retry policy.
    webhook_secret: str = field(default="", repr=False)
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 30.0
    webhook_timeout_s: float = 10.0
    # Webhook URLs may point at loopback, private, link-local, ... addresses (development and tests
    # only: otherwise a client could make the finalizer POST to internal services).
    webhook_allow_private: bool = False
    # The HTTP edge (service/web/edge.py): form fields accepted in one upload; how long a connection
    # may take to send a complete request head (from connecting, or from the previous response on a
    # keep-alive connection); how long a request body may stall before the request is aborted.
    max_form_fields: int = 16
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    # How often a finalizer (one at a time, under a lease) removes expired files and audits every
    # owner's usage counters.
    sweep_interval_s: float = 60.0
    # /readyz remembers a successful storage check this long (service/web/app.py StorageCheck).
    readyz_storage_cache_s: float = 15.0
    # OpenTelemetry traces (service/core/tracing.py): the OTLP/HTTP traces URL ("" = off), the
    # service name, and the share of request lines traced.
    otel_traces_endpoint: str = ""
    otel_service_name: str = "sluice"
    trace_line_sample: float = 0.01

    def provider(self, name: str) -> Provider | None:
        """The configured provider called ``name``."""
        return self._providers_by_name.get(name)

    @functools.cached_property
    def _providers_by_name(self) -> dict[str, Provider]:
        # Looked up twice per request line by the workers. The first of a repeated name wins, as a scan would.
        by_name: dict[str, Provider] = {}
        for p in self.providers:
            by_name.setdefault(p.name, p)
        return by_name

    def provider_for(self, model: str, chosen: str = "") -> Provider | None:
        """The provider a line goes to: the batch's chosen one (x-sluice-provider), else by model."""
        return self.provider(chosen) if chosen else route(self.providers, model)

    def window(self, file_bytes: int, lines: int) -> int:
        """How many lines of a batch Redis holds at a time: bounded in lines and in bytes."""
        line_bytes = max(1, file_bytes // max(1, lines))
        return max(MIN_WINDOW_LINES, min(self.window_lines, self.window_bytes // line_bytes))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default: ``os.environ``); raise ConfigError on bad values."""
        env = os.environ if env is None else env
        tokens = tuple(t.strip() for t in env.get("SLUICE_API_TOKENS", "").split(",") if t.strip())
        providers, quotas = load_providers(env)
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            redis_cluster=cast(
                RedisClusterMode, _choice(env, "SLUICE_REDIS_CLUSTER", cls.redis_cluster, REDIS_CLUSTER_MODES)
            ),
            port=_int(env, "PORT", cls.port, minimum=0),
            data_dir=Path(env.get("SLUICE_DATA_DIR", "").strip() or cls.data_dir),
            api_tokens=tokens,
            worker_concurrency=_int(env, "SLUICE_WORKER_CONCURRENCY", cls.worker_concurrency, minimum=1),
            max_attempts=_int(env, "SLUICE_MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            completion_window_s=_int(env, "SLUICE_COMPLETION_WINDOW_S", cls.completion_window_s, minimum=1),
            shutdown_grace_s=_float(env, "SLUICE_SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
            lease_s=_float(env, "SLUICE_LEASE_S", cls.lease_s, minimum=1.0),
            max_deliveries=_int(env, "SLUICE_MAX_DELIVERIES", cls.max_deliveries, minimum=1),
            retention_s=_int(env, "SLUICE_RETENTION_S", cls.retention_s, minimum=60),
            max_batch_file_bytes=_int(env, "SLUICE_MAX_BATCH_FILE_BYTES", cls.max_batch_file_bytes, minimum=1),
            max_file_bytes=_int(env, "SLUICE_MAX_FILE_BYTES", cls.max_file_bytes, minimum=1),
            max_batch_lines=_int(env, "SLUICE_MAX_BATCH_LINES", cls.max_batch_lines, minimum=1),
            window_lines=_int(env, "SLUICE_WINDOW_LINES", cls.window_lines, minimum=1),
            window_bytes=_int(env, "SLUICE_WINDOW_BYTES", cls.window_bytes, minimum=1),
            log_level=env.get("SLUICE_LOG_LEVEL", "").strip().lower() or cls.log_level,
            providers=providers,
            quotas=quotas,
            secret_key=env.get("SLUICE_SECRET_KEY", "").strip(),
            metrics_token=env.get("SLUICE_METRICS_TOKEN", "").strip(),
            s3=parse_storage(env),
            webhook_secret=webhook_secret(env),
            webhook_max_attempts=_int(env, "SLUICE_WEBHOOK_MAX_ATTEMPTS", cls.webhook_max_attempts, minimum=1),
            webhook_backoff_s=_float(env, "SLUICE_WEBHOOK_BACKOFF_S", cls.webhook_backoff_s, minimum=0.01),
            webhook_timeout_s=_float(env, "SLUICE_WEBHOOK_TIMEOUT_S", cls.webhook_timeout_s, minimum=0.1),
            webhook_allow_private=_bool(env, "SLUICE_WEBHOOK_ALLOW_PRIVATE", cls.webhook_allow_private),
            # 4: file, purpose and the two expires_after[...] fields of a complete upload form.
            max_form_fields=_int(env, "SLUICE_MAX_FORM_FIELDS", cls.max_form_fields, minimum=4, maximum=1000),
            header_timeout_s=_float(env, "SLUICE_HEADER_TIMEOUT_S", cls.header_timeout_s, minimum=0.1, maximum=3600.0),
            body_idle_timeout_s=_float(
                env, "SLUICE_BODY_IDLE_TIMEOUT_S", cls.body_idle_timeout_s, minimum=0.1, maximum=3600.0
            ),
            sweep_interval_s=_float(env, "SLUICE_SWEEP_INTERVAL_S", cls.sweep_interval_s, minimum=0.1),
            readyz_storage_cache_s=_float(env, "SLUICE_READYZ_STORAGE_CACHE_S", cls.readyz_storage_cache_s),
            otel_traces_endpoint=otel_traces_endpoint(env),
            otel_service_name=env.get("OTEL_SERVICE_NAME", "").strip() or cls.otel_service_name,
            trace_line_sample=_float(env, "SLUICE_TRACE_LINE_SAMPLE", cls.trace_line_sample, maximum=1.0),
        )
