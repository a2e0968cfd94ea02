"""Edge limits through the in-process app: the form field cap, bodies without a Content-Length, and
the settings that configure the edge (the timeouts need a real process: tests/integration/test_edge.py)."""

from __future__ import annotations

import json

import pytest

from service.core.config import ConfigError, Settings
from service.web.api import MAX_JSON_BODY_BYTES, upload_body_limit

from .conftest import CHAT, good_jsonl


async def test_form_field_cap(make_api):
    api = await make_api(max_form_fields=6)
    # Exactly the cap: accepted (repeating a field is harmless, the last value counts).
    ok = await api.upload(good_jsonl(), fields=[("purpose", "batch")] * 4)
    assert ok.ok()["purpose"] == "batch"
    # One more part than the cap: refused, and nothing is stored.
    over = await api.upload(good_jsonl(), fields=[("purpose", "batch")] * 5)
    err = over.error(400, code="too_many_fields")
    assert "at most 6" in err["message"]
    assert over.headers.get("Connection", "").lower() == "close"
    assert len(api.storage.stored_files()) == 1 and api.storage.temp_files() == []


async def test_chunked_json_body_over_the_limit_is_413(api):
    async def chunks():
        yield b'{"input_file_id": "file-x", "metadata": {"k": "'
        for _ in range(MAX_JSON_BODY_BYTES // 65536 + 1):
            yield b"v" * 65536
        yield b'"}}'

    resp = await api.request("POST", "/v1/batches", data=chunks(), headers={"Content-Type": "application/json"})
    resp.error(413, code="request_too_large")


async def test_declared_length_checked_before_auth_and_body(api):
    body = json.dumps({"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}).encode()
    resp = await api.request(
        "POST",
        "/v1/batches",
        token=None,
        data=body + b" " * MAX_JSON_BODY_BYTES,
        headers={"Content-Type": "application/json"},
    )
    resp.error(413, code="request_too_large")


def test_edge_settings_and_their_bounds():
    s = Settings.from_env({})
    assert (s.max_form_fields, s.header_timeout_s, s.body_idle_timeout_s) == (16, 10.0, 30.0)
    s = Settings.from_env(
        {"SLUICE_MAX_FORM_FIELDS": "8", "SLUICE_HEADER_TIMEOUT_S": "2.5", "SLUICE_BODY_IDLE_TIMEOUT_S": "5"}
    )
    assert (s.max_form_fields, s.header_timeout_s, s.body_idle_timeout_s) == (8, 2.5, 5.0)
    assert upload_body_limit(s) > max(s.max_file_bytes, s.max_batch_file_bytes)
    for name, value in (
        ("SLUICE_MAX_FORM_FIELDS", "3"),
        ("SLUICE_MAX_FORM_FIELDS", "1001"),
        ("SLUICE_HEADER_TIMEOUT_S", "0"),
        ("SLUICE_HEADER_TIMEOUT_S", "nan"),
        ("SLUICE_HEADER_TIMEOUT_S", "3601"),
        ("SLUICE_BODY_IDLE_TIMEOUT_S", "-1"),
        ("SLUICE_BODY_IDLE_TIMEOUT_S", "soon"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})
