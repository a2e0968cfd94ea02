"""Pure helpers of the command-line client (service/cli/http.py, display.py, commands.py): no server involved."""

from __future__ import annotations

import argparse
import io

import pytest

from service.cli import commands, display, http
from service.cli.main import build_parser


@pytest.mark.parametrize(
    "raw, url",
    [
        ("http://h:8000", "http://h:8000"),
        ("http://h:8000/", "http://h:8000"),
        ("http://h:8000/v1", "http://h:8000"),
        ("https://h/sluice/v1/", "https://h/sluice"),
        ("localhost:8000", "http://localhost:8000"),
    ],
)
def test_normalize_url(raw, url):
    assert http.normalize_url(raw) == url


def test_target_from_flags_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLUICE_URL", "http://env:1/v1")
    monkeypatch.setenv("SLUICE_TOKEN", "env-tok")
    ns = argparse.Namespace()
    assert http.resolve_target(ns) == http.Target("http://env:1", "env-tok")
    ns = argparse.Namespace(url="http://flag:2", token="flag-tok")
    assert http.resolve_target(ns) == http.Target("http://flag:2", "flag-tok")
    monkeypatch.delenv("SLUICE_URL")
    monkeypatch.delenv("SLUICE_TOKEN")
    monkeypatch.setenv("SLUICE_DATA_DIR", str(tmp_path))
    with pytest.raises(http.ClientError) as e:
        http.resolve_target(argparse.Namespace())
    assert e.value.code == 2 and "SLUICE_TOKEN" in e.value.message
    (tmp_path / "dev-token").write_text("sk-sluice-dev-x\n")
    assert http.resolve_target(argparse.Namespace()) == http.Target(http.DEFAULT_URL, "sk-sluice-dev-x")


def test_check_jsonl(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_bytes(b'\xef\xbb\xbf\n{"custom_id": "a", "url": "/v1/embeddings"}\r\n{"b": 1}\n')
    assert commands.check_jsonl(good) == "/v1/embeddings"
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2}\nnot json at all\n')
    with pytest.raises(http.ClientError) as e:
        commands.check_jsonl(bad)
    assert "line 3 is not valid JSON" in e.value.message and "3: not json at all" in e.value.message
    with pytest.raises(http.ClientError) as e:
        commands.check_jsonl(tmp_path / "missing")
    assert e.value.code == 2


def test_read_lines_counts_physical_lines(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text("one\n\nthree\n" + "x" * 1000 + "\n")
    got = commands.read_lines(f, {1, 3, 4})
    assert got[1] == "one" and got[3] == "three"
    assert got[4].startswith("x" * commands.LINE_PREVIEW) and got[4].endswith("chars)")


def test_rate_and_progress_text():
    rate = display.Rate(window=10)
    assert rate.add(0.0, 0) is None
    assert rate.add(2.0, 20) == pytest.approx(10.0)
    batch = {"id": "batch_1", "status": "in_progress", "request_counts": {"total": 100, "completed": 18, "failed": 2}}
    assert display.progress_text(batch, 10.0) == (
        "batch_1 in_progress: 20/100 (20%), 18 completed, 2 failed, 10.0 req/s, ETA 0:08"
    )
    assert display.progress_text({"id": "b", "status": "validating", "request_counts": {}}, None) == "b validating"


def test_upload_progress_plain_lines():
    out = io.StringIO()
    p = display.Progress("uploading f", 3_000_000, out, interval=0)
    p.advance(1_000_000)
    p.advance(2_000_000)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("uploading f: 33% (1.0 MB of 3.0 MB")
    assert lines[-1].startswith("uploading f: 100% (3.0 MB of 3.0 MB")


def test_print_batch_errors_with_local_lines(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"ok": 1}\n{"custom_id": "x"}\n')
    batch = {
        "id": "batch_1",
        "errors": {
            "data": [
                {
                    "code": "missing_required_parameter",
                    "message": "Missing required parameter: 'method'.",
                    "param": "method",
                    "line": 2,
                },
                {"code": "too_many_tasks", "message": "Too many.", "param": None, "line": None},
            ]
        },
    }
    out = io.StringIO()
    commands.print_batch_errors(batch, f, out)
    # A whole-file error is no "invalid line" (issue 13: a file with too many lines read "1 invalid line").
    assert out.getvalue().splitlines() == [
        f"1 invalid line in {f} (nothing was sent upstream):",
        "  line 2: missing_required_parameter [method]: Missing required parameter: 'method'.",
        '    > {"custom_id": "x"}',
        "the file as a whole (nothing was sent upstream): too_many_tasks: Too many.",
        "  `sluice submit FILE --wait --out DIR` runs a file over the server's limits as several batches",
    ]
    assert commands.describe_failure(batch) == "1 invalid line and too many requests for one batch"


def test_too_many_lines_alone_is_not_an_invalid_line():
    batch = {
        "id": "batch_1",
        "errors": {
            "data": [
                {
                    "code": "too_many_tasks",
                    "message": "The batch input file has more than 5 requests.",
                    "param": None,
                    "line": None,
                }
            ]
        },
    }
    out = io.StringIO()
    commands.print_batch_errors(batch, None, out)
    assert "invalid line" not in out.getvalue()
    assert out.getvalue().startswith(
        "the file as a whole (nothing was sent upstream): too_many_tasks: The batch "
        "input file has more than 5 requests."
    )
    assert commands.describe_failure(batch) == "too many requests for one batch"


def test_print_batch_errors_of_a_part_shows_the_lines_of_the_whole_file(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(f'{{"n": {i}}}\n' for i in range(1, 11)))
    batch = {
        "id": "batch_1",
        "errors": {"data": [{"code": "invalid_request", "message": "M.", "param": None, "line": 2}]},
    }
    out = io.StringIO()
    commands.print_batch_errors(batch, f, out, line_offset=6)  # the part starts at line 7
    assert out.getvalue().splitlines()[1:] == ["  line 8: invalid_request: M.", '    > {"n": 8}']


def test_list_options_without_the_word_list():
    parser = build_parser()
    a = parser.parse_args(["batches", "--limit", "2"])
    assert (a.batches_command, a.limit, a.after) == (None, 2, None)
    a = parser.parse_args(["batches", "--limit", "2", "list"])
    assert (a.batches_command, a.limit) == ("list", 2), "the subcommand's default must not win"
    a = parser.parse_args(["batches", "list", "--after", "batch_1"])
    assert (a.limit, a.after) == (20, "batch_1")
    a = parser.parse_args(["files", "--purpose", "batch", "--limit", "5"])
    assert (a.files_command, a.purpose, a.limit) == (None, "batch", 5)
    a = parser.parse_args(["files"])
    assert (a.purpose, a.limit, a.after) == (None, 100, None)
    a = parser.parse_args(["files", "download", "file-1", "--force"])
    assert (a.files_command, a.force) == ("download", True)


def test_every_command_names_the_environment_it_reads():
    import contextlib

    for argv, names in [
        (["web"], ["REDIS_URL", "PORT", "SLUICE_API_TOKENS"]),
        (["worker"], ["SLUICE_UPSTREAM_URL"]),
        (["finalizer"], ["SLUICE_STORAGE_URL"]),
        (["up"], ["PORT", "SLUICE_DATA_DIR", "REDIS_URL"]),
        (["mock-provider"], ["reads no environment variable"]),
        (["status"], ["REDIS_URL", "stack.json"]),
        (["tokens"], ["REDIS_URL"]),
        (["tokens", "create"], ["REDIS_URL", "SLUICE_CONFIG"]),
        (["tokens", "list"], ["REDIS_URL"]),
        (["tokens", "revoke"], ["REDIS_URL"]),
        (["submit"], ["SLUICE_URL", "SLUICE_TOKEN", "--resume"]),
        (["batches"], ["SLUICE_URL", "SLUICE_TOKEN"]),
        (["files"], ["SLUICE_URL", "SLUICE_TOKEN"]),
    ]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
        for name in names:
            assert name in out.getvalue(), f"sluice {' '.join(argv)} --help does not mention {name}"


def test_parser_accepts_options_at_any_level():
    parser = build_parser()
    a = parser.parse_args(["batches", "--url", "http://u", "get", "batch_1", "--json"])
    assert (a.url, a.batches_command, a.id, a.json) == ("http://u", "get", "batch_1", True)
    a = parser.parse_args(["batches"])
    assert a.batches_command is None and not hasattr(a, "url")
    a = parser.parse_args(["files", "download", "file-1", "-o", "-", "-k", "t"])
    assert (a.files_command, a.output, a.token) == ("download", "-", "t")
    a = parser.parse_args(["submit", "r.jsonl", "--wait", "--out", "d", "-m", "k=v"])
    assert (a.file, a.wait, a.out, a.metadata, a.endpoint) == ("r.jsonl", True, "d", ["k=v"], None)
