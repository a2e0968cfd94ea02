"""structlog set-up: JSON lines when not on a terminal, readable console output on one.

Every line goes through :class:`Redactor` last before rendering, so no secret reaches a log:
values under keys that name a secret (``authorization``, ``api_key``, ``token``, ``secret``,
``password``, ``x-sluice-provider-key`` ...), bearer credentials, ``sk-...`` keys, passwords in
URLs, and every secret the process was configured with (API tokens, provider keys, the server
secret, the Redis password) are replaced by ``[redacted]``, in nested values and in rendered
exceptions too.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Iterable, Mapping, MutableMapping, TextIO
from urllib.parse import urlsplit

import structlog

from .config import Settings

REDACTED = "[redacted]"

# A key holding any of these (case-insensitive, ``-`` and ``_`` alike) names a secret.
SECRET_KEY_PARTS = (
    "authorization",
    "api_key",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "provider_key",
    "access_key",
    "credential",
    "cookie",
    "signature",
)
# Short configured secrets are only redacted where a value is exactly the secret: replacing every
# occurrence of a 3-character string inside other values would mangle the logs.
MIN_SUBSTRING_SECRET = 4

_PATTERNS = (
    # "Bearer <credential>" (an Authorization header however it was rendered)
    r"(?P<bearer>\b(?i:bearer)\s+)[^\s\"',;)\]}>]+",
    # OpenAI-style keys, and Sluice's own managed tokens (sk-sluice-...)
    r"\bsk-[A-Za-z0-9_\-]{8,}",
)
# The password of credentials in a URL: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+@")


def redact_url(url: str) -> str:
    """``url`` with the password of its credentials (``scheme://user:PASSWORD@host``) redacted."""
    return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", url)


def settings_secrets(settings: Settings) -> tuple[str, ...]:
    """Every secret a process configured with ``settings`` knows, for :func:`configure_logging`."""
    found = [
        *settings.api_tokens,
        settings.secret_key,
        getattr(settings, "metrics_token", ""),
        getattr(settings, "webhook_secret", ""),
        *(p.api_key for p in settings.providers),
    ]
    try:
        password = urlsplit(settings.redis_url).password
    except ValueError:
        password = None
    if password:
        found.append(password)
    return tuple(s for s in dict.fromkeys(found) if s)


def _is_secret_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return any(part in k for part in SECRET_KEY_PARTS)


class Redactor:
    """A structlog processor replacing secrets in an event dict with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        secrets = {s for s in secrets if s}
        self.exact = frozenset(secrets)
        long_ones = sorted((s for s in secrets if len(s) >= MIN_SUBSTRING_SECRET), key=len, reverse=True)
        # Longest first, so a secret containing another one is replaced whole.
        self.pattern = re.compile("|".join([*(re.escape(s) for s in long_ones), *_PATTERNS]))

    def scrub(self, text: str) -> str:
        """``text`` with every secret in it replaced."""
        if text in self.exact:
            return REDACTED
        text = self.pattern.sub(self._replace, text)
        if "://" in text:
            text = redact_url(text)
        return text

    @staticmethod
    def _replace(match: re.Match[str]) -> str:
        return (match.group("bearer") or "") + REDACTED

    def value(self, value: Any) -> Any:
        """``value`` (any structure) with secrets replaced; untouched objects are kept as they are."""
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            text = bytes(value).decode("utf-8", "replace")
            scrubbed = self.scrub(text)
            return value if scrubbed == text else scrubbed
        if isinstance(value, dict):
            return self._mapping(value)
        if isinstance(value, tuple):
            return tuple(self.value(v) for v in value)
        if isinstance(value, (list, set, frozenset)):
            return [self.value(v) for v in value]
        try:
            if isinstance(value, BaseException):
                # An exception logged as a value (error=e) is shown as "Type: message".
                return self.scrub(f"{type(value).__name__}: {value}")
            # Anything else is rendered with repr (a header mapping, a dataclass...): check that.
            text = repr(value)
        except Exception:
            return "<unrepresentable>"
        scrubbed = self.scrub(text)
        return value if scrubbed == text else scrubbed

    def _mapping(self, mapping: Mapping[Any, Any]) -> dict[Any, Any]:
        return {k: REDACTED if _is_secret_key(k) and not _harmless(v) else self.value(v) for k, v in mapping.items()}

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        return self._mapping(event_dict)


class _Handler(logging.StreamHandler[TextIO]):
    """The root logger's handler that ``configure_logging`` installs, and replaces when called again."""

    _sluice = True  # how a later call (or a test) finds it among the root logger's handlers


def _harmless(value: Any) -> bool:
    """Counts and flags under a secret-sounding key (``max_tokens=...``) are no secret."""
    return value is None or isinstance(value, (bool, int, float))


class _RedactingFormatter(logging.Formatter):
    """Stdlib log records (aiohttp's, asyncio's) get the same redaction as structlog's lines."""

    def __init__(self, redactor: Redactor, fmt: str) -> None:
        super().__init__(fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.scrub(super().format(record))


def configure_logging(
    level: str = "info",
    *,
    process: str = "",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging once per process.

    ``secrets``: strings that must never appear in a log line (see :func:`settings_secrets`).
    ``stream``: where lines go (default ``sys.stderr``); JSON unless it is a terminal.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    stream = sys.stderr if stream is None else stream
    redactor = Redactor(secrets)
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    renderer = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if tty
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,  # after format_exc_info: the rendered traceback is redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    # aiohttp's access log per request is noise at info; its errors still show.
    handler = _Handler(stream)
    handler.setFormatter(_RedactingFormatter(redactor, "%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sluice", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
