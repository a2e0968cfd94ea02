"""Log set-up: JSON off a terminal, console lines on one, and no secret in any line.

Secrets are redacted wherever they appear in an event: under keys that name a secret, as bearer
credentials or ``sk-`` keys in any value, as the exact configured secrets (API tokens, provider
keys, the server secret, the Redis password) inside any string, nested dicts and lists, exception
objects, rendered tracebacks, and stdlib log records.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from service.core.config import Provider, Settings
from service.core.log import REDACTED, Redactor, configure_logging, settings_secrets

API_TOKEN = "tok-unit-3c9d1e"
MANAGED_TOKEN = "sk-sluice-Zm9vYmFyYmF6cXV4cXV1eA"
PROVIDER_KEY = "prov-key-5f1e9a0b"
SECOND_PROVIDER_KEY = "p2-8b7a6c5d4e"
SERVER_SECRET = "server-secret-77aa42"
REDIS_PASSWORD = "redispw-0d1e2f"
METRICS_TOKEN = "metrics-tok-1a2b3c"
# Not configured anywhere: caught by their shape or by the key they are logged under.
BEARER_CREDENTIAL = "unlisted-bearer-9f8e7d"
OPENAI_KEY = "sk-proj-abcdefghijklmnop0123"
BYOK_KEY = "byok-client-key-4455"
PASSWORD = "pw-under-a-key-6677"

SETTINGS = Settings(
    redis_url=f"rediss://:{REDIS_PASSWORD}@redis.example:6380/0",
    api_tokens=(API_TOKEN, "tok-b2"),
    providers=(
        Provider(name="openai", base_url="https://api.example", api_key=PROVIDER_KEY),
        Provider(name="vllm", base_url="http://vllm", api_key=SECOND_PROVIDER_KEY),
        Provider(name="nokey", base_url="http://nokey"),
    ),
    secret_key=SERVER_SECRET,
    metrics_token=METRICS_TOKEN,
)
ALL_SECRETS = (
    API_TOKEN,
    MANAGED_TOKEN,
    PROVIDER_KEY,
    SECOND_PROVIDER_KEY,
    SERVER_SECRET,
    REDIS_PASSWORD,
    METRICS_TOKEN,
    BEARER_CREDENTIAL,
    OPENAI_KEY,
    BYOK_KEY,
    PASSWORD,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    """Leave structlog and the root logger as they were for the tests that follow."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _configure(stream=None, level: str = "info") -> None:
    configure_logging(level, process="unit", secrets=settings_secrets(SETTINGS), stream=stream)


def _log_everything() -> None:
    log = structlog.get_logger("sluice.test").bind(batch_id="batch_abc", custom_id="req-1", provider="openai")
    # Keys that name a secret.
    log.info(
        "secret_keys",
        authorization=f"Bearer {BEARER_CREDENTIAL}",
        api_key=OPENAI_KEY,
        token=API_TOKEN,
        x_sluice_provider_key=BYOK_KEY,
        password=PASSWORD,
        secret=SERVER_SECRET,
        attempt=2,
        max_tokens=64,
    )
    # Secrets inside ordinary values, nested.
    log.warning(
        "secret_values",
        note=f"calling openai with key {PROVIDER_KEY} for token {API_TOKEN}",
        headers={
            "Authorization": f"Bearer {BEARER_CREDENTIAL}",
            "X-Sluice-Provider-Key": BYOK_KEY,
            "content-type": "application/json",
        },
        nested={
            "level1": [{"level2": f"redis at rediss://:{REDIS_PASSWORD}@redis.example:6380/0"}],
            "tuple": (SERVER_SECRET, SECOND_PROVIDER_KEY),
        },
        managed=MANAGED_TOKEN,
        scrape=f"GET /metrics with {METRICS_TOKEN}",
        header_line=f"authorization: bearer {BEARER_CREDENTIAL}",
        raw=f"key={OPENAI_KEY}".encode(),
        error=ValueError(f"the server secret {SERVER_SECRET} does not open this"),
    )
    # An exception whose text and traceback hold secrets.
    try:
        raise RuntimeError(f"provider refused {PROVIDER_KEY} (Authorization: Bearer {BEARER_CREDENTIAL})")
    except RuntimeError:
        log.exception("line_failed", attempt=3)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _assert_clean(text: str) -> None:
    leaked = [s for s in ALL_SECRETS if s in text]
    assert not leaked, f"secrets in the log output: {leaked}\n{text}"
    assert REDACTED in text


def test_no_secret_reaches_json_output():
    out = io.StringIO()
    _configure(out)
    _log_everything()
    text = out.getvalue()
    _assert_clean(text)

    lines = _lines(text)  # JSON off a terminal: every line parses
    assert [line["event"] for line in lines] == ["secret_keys", "secret_values", "line_failed"]
    for line in lines:
        assert line["batch_id"] == "batch_abc" and line["custom_id"] == "req-1" and line["provider"] == "openai"
        assert line["process"] == "unit" and line["timestamp"] and line["level"]

    keys, values, failed = lines
    for k in ("authorization", "api_key", "token", "x_sluice_provider_key", "password", "secret"):
        assert keys[k] == REDACTED, (k, keys[k])
    # Numbers are no secret, whatever their key.
    assert keys["attempt"] == 2 and keys["max_tokens"] == 64

    assert values["note"] == f"calling openai with key {REDACTED} for token {REDACTED}"
    assert values["headers"] == {
        "Authorization": REDACTED,
        "X-Sluice-Provider-Key": REDACTED,
        "content-type": "application/json",
    }
    assert values["nested"]["level1"][0]["level2"] == f"redis at rediss://:{REDACTED}@redis.example:6380/0"
    assert values["nested"]["tuple"] == [REDACTED, REDACTED]
    assert values["managed"] == REDACTED
    assert values["scrape"] == f"GET /metrics with {REDACTED}"
    assert values["header_line"] == f"authorization: bearer {REDACTED}"
    assert values["raw"] == f"key={REDACTED}"
    assert values["error"] == f"ValueError: the server secret {REDACTED} does not open this"

    assert failed["level"] == "error" and failed["attempt"] == 3
    assert "Traceback" in failed["exception"] and "RuntimeError" in failed["exception"]
    assert f"provider refused {REDACTED} (Authorization: Bearer {REDACTED})" in failed["exception"]


def test_console_output_on_a_terminal_is_readable_and_redacted():
    out = _Tty()
    _configure(out)
    _log_everything()
    text = out.getvalue()
    _assert_clean(text)
    first = text.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    assert "secret_keys" in first and "batch_abc" in first
    assert "Traceback" in text


def test_default_stream_is_stderr(capsys):
    _configure()
    _log_everything()
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_clean(captured.err)
    assert len(_lines(captured.err)) == 3  # pytest's capture is no terminal: JSON


def test_stdlib_log_records_are_redacted_too():
    out = io.StringIO()
    _configure(out)
    logging.getLogger("aiohttp.server").error(
        "request with Authorization: Bearer %s failed (%s)", BEARER_CREDENTIAL, PROVIDER_KEY
    )
    try:
        raise OSError(f"cannot reach rediss://:{REDIS_PASSWORD}@redis.example:6380")
    except OSError:
        logging.getLogger("asyncio").exception("task failed")
    text = out.getvalue()
    _assert_clean(text)
    assert "aiohttp.server ERROR" in text and "asyncio ERROR" in text and "Traceback" in text


def test_debug_lines_are_dropped_at_info_and_redacted_at_debug():
    out = io.StringIO()
    _configure(out, level="info")
    structlog.get_logger("t").debug("line_done", note=PROVIDER_KEY)
    assert out.getvalue() == ""
    structlog.reset_defaults()
    _configure(out, level="debug")
    structlog.get_logger("t").debug("line_done", note=PROVIDER_KEY)
    [line] = _lines(out.getvalue())
    assert line["note"] == REDACTED


def test_settings_secrets_lists_every_configured_secret():
    found = settings_secrets(SETTINGS)
    assert set(found) == {
        API_TOKEN,
        "tok-b2",
        PROVIDER_KEY,
        SECOND_PROVIDER_KEY,
        SERVER_SECRET,
        REDIS_PASSWORD,
        METRICS_TOKEN,
    }
    assert "" not in found
    assert settings_secrets(Settings()) == ()


def test_redactor_leaves_ordinary_values_alone():
    r = Redactor(["abc", "long-secret-1"])
    event = {
        "event": "batch_finished",
        "batch_id": "batch_123",
        "status": "completed",
        "completed": 10,
        "ids": ["req-1", "req-2"],
        "file": "file-abc123",
        "tokens": None,
        "ok": True,
    }
    assert r(None, "info", dict(event)) == event
    # A short configured secret is redacted only where a value is exactly that secret.
    assert r.scrub("abc") == REDACTED
    assert r.scrub("xabcx") == "xabcx"
    assert r.scrub("one long-secret-1 two") == f"one {REDACTED} two"
    assert r.scrub("sk-short") == "sk-short"  # too short to be a key; ids like this stay readable


def test_every_process_configures_logging_with_its_secrets(capsys):
    """``run_until_signal`` (web, worker, finalizer) hands the settings' secrets to the redactor."""
    import asyncio

    from service.core.lifecycle import run_until_signal

    class Component:
        def __init__(self) -> None:
            self.stop = asyncio.Event()

        async def run(self) -> None:
            structlog.get_logger("sluice.test").warning(
                "started", note=f"{API_TOKEN} {PROVIDER_KEY} {SECOND_PROVIDER_KEY} {SERVER_SECRET} {REDIS_PASSWORD}"
            )

    run_until_signal("unit", SETTINGS, Component)
    err = capsys.readouterr().err
    _assert_clean(err)
    [line] = _lines(err)
    assert line["note"] == " ".join([REDACTED] * 5) and line["process"] == "unit"
