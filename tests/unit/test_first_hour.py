"""The pieces behind a newcomer's first hour (issue 13), without processes: the local check and split of a
submit (service/cli/scan.py), the stack file of `sluice up` (service/cli/localstack.py), how the client
finds its server, result file names, and request ids on every response."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import structlog

from service.cli import http, localstack, scan
from service.core.config import ClientSettings
from service.core.log import configure_logging
from service.core.results import result_filename
from service.web.app import request_id

CHAT = "/v1/chat/completions"


def row(custom_id: str, **body) -> str:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"model": "m", "messages": [], **body}}
    )


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------------------------
# the local check and split


def test_scan_refuses_a_custom_id_used_twice_anywhere(tmp_path):
    lines = [row(f"c{i}") for i in range(3000)]
    lines[2500] = row("c7")  # far from the first: in another part
    lines.insert(10, "")
    found = scan.scan(write(tmp_path / "f.jsonl", lines), CHAT, max_lines=1000, max_bytes=10**9)
    assert found.error_count == 1
    (e,) = found.errors
    assert (e.code, e.line, e.param) == ("duplicate_custom_id", 2502, "custom_id")


def test_scan_tells_hash_collisions_from_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "hash", lambda value: 42, raising=False)  # every custom_id collides
    found = scan.scan(
        write(tmp_path / "f.jsonl", [row(f"c{i}") for i in range(50)] + [row("c3")]),
        CHAT,
        max_lines=1000,
        max_bytes=10**9,
    )
    assert [(e.code, e.line) for e in found.errors] == [("duplicate_custom_id", 51)]


def test_scan_validates_every_line_as_the_server_does(tmp_path):
    lines = [
        row("a"),
        json.dumps({"custom_id": "b", "method": "GET", "url": CHAT, "body": {"model": "m"}}),
        "not json",
        json.dumps({"custom_id": "d", "method": "POST", "url": CHAT, "body": {}}),
        row("e", stream=True),
    ] + [row(f"x{i}") for i in range(30)]
    found = scan.scan(write(tmp_path / "f.jsonl", lines), CHAT, max_lines=10, max_bytes=10**9)
    assert [(e.line, e.code) for e in found.errors] == [
        (2, "invalid_method"),
        (3, "invalid_json_line"),
        (4, "invalid_request"),
        (5, "streaming_unsupported"),
    ]
    assert found.lines == 35


@pytest.mark.parametrize("max_lines, max_bytes", [(7, 10**9), (1000, 700), (4, 500)])
def test_scan_cuts_parts_that_fit_and_cover_every_line_once(tmp_path, max_lines, max_bytes):
    lines = ["", row("first")] + [row(f"c{i}", pad="p" * (i % 50)) for i in range(60)]
    lines[20:20] = ["", "   "]
    path = write(tmp_path / "f.jsonl", lines)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b"\n\n")
    found = scan.scan(path, CHAT, max_lines=max_lines, max_bytes=max_bytes)
    assert found.error_count == 0, found.errors
    data = path.read_bytes()
    ids: list[str] = []
    previous_end = 0
    for span in found.spans:
        assert span.start == previous_end, "parts are contiguous"
        previous_end = span.end
        chunk = data[span.start : span.end]
        assert len(chunk) <= max_bytes and span.lines <= max_lines
        requests = [ln for ln in chunk.removeprefix(b"\xef\xbb\xbf").split(b"\n") if ln.strip()]
        assert len(requests) == span.lines
        # first_line is the physical line number of the part's first byte in the whole file
        assert data[: span.start].count(b"\n") + 1 == span.first_line
        ids += [json.loads(r)["custom_id"] for r in requests]
    assert ids == ["first"] + [f"c{i}" for i in range(60)], "every request once, in order"
    assert len(found.spans) > 1


def test_scan_names_a_line_bigger_than_a_batch_file(tmp_path):
    found = scan.scan(
        write(tmp_path / "f.jsonl", [row("a"), row("b", pad="x" * 2000), row("c")]), CHAT, max_lines=100, max_bytes=1000
    )
    assert [(e.code, e.line) for e in found.errors] == [("line_too_long", 2)]


# --------------------------------------------------------------------------------------------
# the stack file and how the client finds its server


def _stack(data_dir: Path, pid: int) -> localstack.LocalStack:
    return localstack.LocalStack(
        api_url="http://localhost:18999",
        dashboard_url="http://localhost:18999/dashboard/",
        redis_url="redis://127.0.0.1:1/0",
        token="sk-sluice-dev-t",
        data_dir=str(data_dir),
        pid=pid,
        started_at=0,
    )


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stack_file_is_private_and_ignored_once_its_sluice_up_is_gone(tmp_path):
    path = tmp_path / localstack.FILE_NAME
    localstack.write(path, _stack(tmp_path, os.getpid()))
    assert path.stat().st_mode & 0o777 == 0o600, "it holds the token"
    found = localstack.load(path)
    assert found is not None and found.token == "sk-sluice-dev-t" and found.path == str(path)
    assert "path" not in json.loads(path.read_text())
    localstack.remove(path, os.getpid() + 1)
    assert path.exists(), "only the sluice up that wrote it removes it"
    localstack.write(path, _stack(tmp_path, _dead_pid()))
    assert localstack.load(path) is None


def test_client_uses_the_stack_when_nothing_is_set(tmp_path, capsys):
    localstack.write(tmp_path / localstack.FILE_NAME, _stack(tmp_path, os.getpid()))
    client = ClientSettings.from_env({"SLUICE_DATA_DIR": str(tmp_path)})
    assert http.resolve_target(argparse.Namespace(), client) == http.Target("http://localhost:18999", "sk-sluice-dev-t")
    assert "using http://localhost:18999 of the `sluice up` stack (pid" in capsys.readouterr().err
    # The environment wins, and then nothing is said.
    client = ClientSettings.from_env(
        {"SLUICE_DATA_DIR": str(tmp_path), "SLUICE_URL": "http://elsewhere:1", "SLUICE_TOKEN": "t"}
    )
    assert http.resolve_target(argparse.Namespace(), client) == http.Target("http://elsewhere:1", "t")
    assert capsys.readouterr().err == ""


def test_client_settings_from_env():
    c = ClientSettings.from_env({"SLUICE_URL": " http://u/v1 ", "SLUICE_TOKEN": "t", "REDIS_URL": "redis://r"})
    assert (c.url, c.token, c.redis_url, c.data_dir_set) == ("http://u/v1", "t", "redis://r", False)
    assert ClientSettings.from_env({"SLUICE_DATA_DIR": "/x"}).data_dir == Path("/x")
    assert "t-secret" not in repr(ClientSettings(token="t-secret")), "the token stays out of reprs"


# --------------------------------------------------------------------------------------------
# names and ids


def test_result_file_names_are_the_servers():
    assert result_filename("batch_1", "output") == "batch_1_output.jsonl"
    assert result_filename("job_2", "error") == "job_2_error.jsonl"
    with pytest.raises(ValueError):
        result_filename("batch_1", "errors")


@pytest.mark.parametrize(
    "given, kept",
    [
        ("abc-123", True),
        ("x" * 200, True),
        ("with space/and:punct", True),
        ("x" * 201, False),
        ("", False),
        (None, False),
        ("tab\there", False),
        ("é", False),
    ],
)
def test_request_id_is_the_clients_when_sane(given, kept):
    rid = request_id(given)
    if kept:
        assert rid == given
    else:
        assert rid.startswith("req_") and len(rid) == 36 and rid != given


async def test_every_response_carries_a_request_id_and_its_log_lines_too(api):
    stream = io.StringIO()
    configure_logging("info", process="web", stream=stream)
    try:
        ok = await api.request("GET", "/v1/batches", headers={"x-request-id": "client-chosen-1"})
        assert ok.status == 200 and ok.headers["x-request-id"] == "client-chosen-1"
        for method, path, token, status in [
            ("GET", "/v1/nowhere", "tok-a", 404),
            ("GET", "/v1/batches", "bad", 401),
            ("GET", "/v1/batches/batch_nope", "tok-a", 404),
            ("GET", "/healthz", None, 200),
            ("GET", "/dashboard", None, 302),
        ]:
            res = await api.request(method, path, token=token, allow_redirects=False)
            assert res.status == status, res
            assert res.headers.get("x-request-id", "").startswith("req_"), (path, dict(res.headers))
        created = await api.request(
            "POST", "/v1/batches", json={"input_file_id": "file-x"}, headers={"x-request-id": "client-chosen-2"}
        )
        assert created.status == 400 and created.headers["x-request-id"] == "client-chosen-2"
    finally:
        structlog.reset_defaults()
        for h in [h for h in logging.getLogger().handlers if getattr(h, "_sluice", False)]:
            logging.getLogger().removeHandler(h)
    lines = [json.loads(ln) for ln in stream.getvalue().splitlines()]
    post = [ln for ln in lines if ln.get("request_id") == "client-chosen-2"]
    assert post and post[0]["event"] == "http_request" and post[0]["status"] == 400, lines
    assert not [ln for ln in lines if ln.get("request_id") == "client-chosen-1"], "successful reads log at debug"
