"""The command-line client (``sluice submit``, ``sluice batches``, ``sluice files``) as a user runs it.

Every command runs as a subprocess with ``SLUICE_URL`` / ``SLUICE_TOKEN`` in its environment,
against a real stack; stdout and stderr are pipes (not a terminal), except in the pty test.
Batches that must still be running when the test acts on them hold their lines at the mock's gate
until the test releases them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import processes
from tests.support.ports import free_port
from tests.support.processes import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SUMMARY = re.compile(r"^(batch_\w+) (\w+): (\d+) completed, (\d+) failed of (\d+) in [\d:]+; (.*)$")


@pytest.fixture(scope="module")
def cstack(module_stack_factory):
    return module_stack_factory.start(name="client-cli", workers=1, worker_concurrency=4, mock={"gates": True})


def client_env(stack, *, url: str | None = None, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "OPENAI_")) and k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env["SLUICE_URL"] = url or stack.base_url
    env["SLUICE_TOKEN"] = token or stack.token
    return env


def cli(
    stack, *args: str, url: str | None = None, token: str | None = None, cwd: Path = ROOT, timeout: float = 60.0
) -> subprocess.CompletedProcess:
    """Run ``sluice ARGS`` to completion; ``timeout`` is a failure deadline (the command's group is killed)."""
    return processes.run(
        [sys.executable, "-m", "service.cli", *args],
        env=client_env(stack, url=url, token=token),
        cwd=cwd,
        timeout=timeout,
    )


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows_of(stack, tag: str, n: int, **extra) -> list[dict]:
    return [stack.chat_line(f"{tag}-{i:03d}", f"{tag} {i}", **extra) for i in range(n)]


def custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# submit


def test_submit_wait_downloads_every_result_once(cstack, tmp_path):
    tag = f"sw-{uuid.uuid4().hex[:6]}"
    rows = rows_of(cstack, tag, 25) + [cstack.chat_line(f"{tag}-bad", "x", mock_status=404)]
    src = write_rows(tmp_path / "requests.jsonl", rows)
    out = tmp_path / "out"
    res = cli(cstack, "submit", str(src), "--wait", "--out", str(out), "--poll-interval", "0.2")
    assert res.returncode == 0, res
    summary = res.stdout.strip().splitlines()[-1]
    m = SUMMARY.match(summary)
    assert m, summary
    batch_id, status, completed, failed, total = m.group(1), m.group(2), *map(int, m.group(3, 4, 5))
    assert (status, completed, failed, total) == ("completed", 25, 1, 26), summary
    output, errors = out / f"{batch_id}_output.jsonl", out / f"{batch_id}_error.jsonl"
    assert str(output) in summary and str(errors) in summary
    # The client names result files as the server does (issue 13: it saved "_errors.jsonl").
    batch = cstack.client().batches.retrieve(batch_id)
    assert cstack.client().files.retrieve(batch.error_file_id).filename == errors.name
    assert cstack.client().files.retrieve(batch.output_file_id).filename == output.name
    assert sorted(p.name for p in out.iterdir()) == sorted([output.name, errors.name]), "no state file is left"
    got = custom_ids(output) + custom_ids(errors)
    assert sorted(got) == sorted(r["custom_id"] for r in rows), "every custom_id exactly once"
    assert custom_ids(errors) == [f"{tag}-bad"]
    # Progress went to stderr, as plain lines (not a terminal): upload, creation, then states.
    assert "as file-" in res.stderr and f"created batch {batch_id}" in res.stderr, res.stderr
    assert f"{batch_id} completed: 26/26 (100%)" in res.stderr, res.stderr
    assert "\r" not in res.stderr


def test_submit_without_wait_and_json(cstack, tmp_path):
    tag = f"sj-{uuid.uuid4().hex[:6]}"
    src = write_rows(tmp_path / "r.jsonl", rows_of(cstack, tag, 3))
    res = cli(cstack, "submit", str(src), "--metadata", "team=a")
    assert res.returncode == 0, res
    batch_id, status = res.stdout.split()[:2]
    assert batch_id.startswith("batch_") and status in ("validating", "in_progress"), res.stdout
    cstack.wait_for_batch(batch_id)

    res = cli(
        cstack, "submit", str(src), "--json", "--wait", "--out", str(tmp_path / "o"), "--poll-interval", "0.2", "--poll"
    )  # polling only, as against a server without the event stream
    assert res.returncode == 0, res
    batch = json.loads(res.stdout)
    assert batch["object"] == "batch" and batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert sorted(custom_ids(tmp_path / "o" / f"{batch['id']}_output.jsonl")) == [f"{tag}-{i:03d}" for i in range(3)]
    assert not (tmp_path / "o" / f"{batch['id']}_error.jsonl").exists()


def test_big_upload_reports_progress(cstack, tmp_path):
    tag = f"big-{uuid.uuid4().hex[:6]}"
    rows = [cstack.chat_line(f"{tag}-{i}", "y" * 3000) for i in range(800)]  # about 2.5 MB
    src = write_rows(tmp_path / "big.jsonl", rows)
    res = cli(cstack, "submit", str(src))
    assert res.returncode == 0, res
    assert re.search(r"uploading big\.jsonl: 100% \(2\.\d MB of 2\.\d MB", res.stderr), res.stderr
    batch = cstack.wait_for_batch(res.stdout.split()[0], timeout=60)
    assert batch.status == "completed" and batch.request_counts.completed == 800


def test_validation_failure_shows_the_offending_line_before_anything_is_uploaded(cstack, tmp_path):
    tag = f"vf-{uuid.uuid4().hex[:6]}"
    good = rows_of(cstack, tag, 3)
    bad = {
        "custom_id": f"{tag}-nomodel",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "z" * 500}]},
    }
    src = write_rows(tmp_path / "v.jsonl", [good[0], good[1], "", bad, good[2], good[0]])
    before = cli(cstack, "files", "list", "--json").stdout
    res = cli(cstack, "submit", str(src), "--wait", "--out", str(tmp_path / "o"), "--poll-interval", "0.2")
    assert res.returncode == 1, res
    assert "2 invalid lines in" in res.stderr and "(nothing was uploaded)" in res.stderr, res.stderr
    assert "line 4: invalid_request [body.model]: Model parameter is required." in res.stderr, res.stderr
    assert f'    > {{"custom_id": "{tag}-nomodel"' in res.stderr, res.stderr
    assert "... (" in res.stderr, "a long line is truncated"
    assert "line 6: duplicate_custom_id [custom_id]" in res.stderr, res.stderr
    assert res.stdout == ""
    assert cli(cstack, "files", "list", "--json").stdout == before, "nothing was uploaded"
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_not_jsonl_is_refused_before_upload(cstack, tmp_path):
    before = cli(cstack, "files", "list", "--json")
    src = tmp_path / "data.csv"
    src.write_text("custom_id,prompt\nq1,hello\n")
    res = cli(cstack, "submit", str(src))
    assert res.returncode == 1, res
    assert f"sluice: {src} is not a JSONL file: line 1 is not valid JSON" in res.stderr, res.stderr
    assert "  1: custom_id,prompt" in res.stderr
    arr = tmp_path / "array.json"
    arr.write_text('[{"custom_id": "a"}]\n')
    res = cli(cstack, "submit", str(arr))
    assert res.returncode == 1 and "line 1 is a JSON list, not an object" in res.stderr, res
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    res = cli(cstack, "submit", str(empty))
    assert res.returncode == 1 and "is empty" in res.stderr, res
    res = cli(cstack, "submit", str(tmp_path / "missing.jsonl"))
    assert res.returncode == 2 and "no such file" in res.stderr, res
    assert cli(cstack, "files", "list", "--json").stdout == before.stdout, "nothing was uploaded"


def test_wrong_url_and_bad_token(cstack, tmp_path):
    src = write_rows(tmp_path / "r.jsonl", rows_of(cstack, "wu", 1))
    dead = f"http://127.0.0.1:{free_port()}"
    res = cli(cstack, "submit", str(src), url=dead)
    assert res.returncode == 1, res
    assert f"sluice: cannot reach Sluice at {dead}" in res.stderr, res.stderr
    res = cli(cstack, "batches", "list", url=dead + "/v1")
    assert res.returncode == 1 and f"cannot reach Sluice at {dead}" in res.stderr, res

    # A server that is not Sluice (the mock provider knows nothing under /_mock/v1; it has a Batch API of
    # its own at /v1, which answers like an OpenAI-compatible provider).
    res = cli(cstack, "batches", "list", url=cstack.mock_url + "/_mock")
    assert res.returncode == 1 and "did not answer like Sluice" in res.stderr, res

    for args in (("submit", str(src)), ("batches", "list"), ("files", "get", "file-x")):
        res = cli(cstack, *args, token="not-a-token")
        assert res.returncode == 1, res
        assert "sluice: the token was refused by Sluice" in res.stderr and "SLUICE_TOKEN" in res.stderr, res.stderr
        assert "not-a-token" not in res.stderr

    # Flags win over the environment (the OpenAI CLI's names work too).
    res = cli(
        cstack,
        "batches",
        "list",
        "--api-base",
        cstack.api_url,
        "--api-key",
        cstack.token,
        url=dead,
        token="not-a-token",
    )
    assert res.returncode == 0, res


def test_usage_errors_exit_2(cstack, tmp_path):
    assert cli(cstack, "submit").returncode == 2
    assert cli(cstack, "batches", "frobnicate").returncode == 2
    src = write_rows(tmp_path / "r.jsonl", rows_of(cstack, "ue", 1))
    res = cli(cstack, "submit", str(src), "--endpoint", "/v1/nothing")
    assert res.returncode == 2, res


# --------------------------------------------------------------------------------------------
# batches and files


def test_batches_list_get_cancel(cstack, tmp_path):
    tag = f"bl-{uuid.uuid4().hex[:6]}"
    token = cstack.tokens[1]  # a token of its own: the list holds exactly these batches
    done = write_rows(tmp_path / "d.jsonl", rows_of(cstack, tag, 2))
    slow = write_rows(tmp_path / "s.jsonl", rows_of(cstack, f"{tag}-s", 40, mock_hold=tag))  # running until released
    first = json.loads(cli(cstack, "submit", str(done), "--json", token=token).stdout)
    cstack.wait_for_batch(first["id"], client=cstack.client(token=token))
    second = json.loads(cli(cstack, "submit", str(slow), "--json", token=token).stdout)

    res = cli(cstack, "batches", "list", token=token)
    assert res.returncode == 0, res
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "DONE/TOTAL", "FAILED", "ENDPOINT", "CREATED"]
    assert [ln.split()[0] for ln in lines[1:]] == [second["id"], first["id"]], "newest first"
    assert lines[2].split()[1:4] == ["completed", "2/2", "0"]
    assert cli(cstack, "batches", token=token).stdout == res.stdout, "list is the default action"
    page = json.loads(cli(cstack, "batches", "list", "--json", token=token).stdout)
    assert page["object"] == "list" and [b["id"] for b in page["data"]] == [second["id"], first["id"]]

    res = cli(cstack, "batches", "get", first["id"], token=token)
    assert res.returncode == 0, res
    assert re.search(rf"^id:\s+{first['id']}$", res.stdout, re.MULTILINE)
    assert re.search(r"^status:\s+completed$", res.stdout, re.MULTILINE)
    assert re.search(r"^requests:\s+2 total, 2 completed, 0 failed$", res.stdout, re.MULTILINE)
    got = json.loads(cli(cstack, "batches", "get", first["id"], "--json", token=token).stdout)
    assert got["id"] == first["id"] and got["output_file_id"]

    res = cli(cstack, "batches", "cancel", second["id"], token=token)
    assert res.returncode == 0 and res.stdout.split() in ([second["id"], "cancelling"], [second["id"], "cancelled"]), (
        res
    )
    cstack.mock().release(tag)
    assert cstack.wait_for_batch(second["id"], client=cstack.client(token=token), timeout=60).status == "cancelled"
    res = cli(cstack, "batches", "cancel", first["id"], token=token)
    assert res.returncode == 1 and f"cannot cancel {first['id']}" in res.stderr and "completed" in res.stderr, res
    res = cli(cstack, "batches", "get", "batch_nope", token=token)
    assert res.returncode == 1 and "No such Batch: 'batch_nope'" in res.stderr, res
    # Another token does not see them.
    assert first["id"] not in cli(cstack, "batches", "list").stdout


def test_files_list_get_download_delete(cstack, tmp_path):
    tag = f"fl-{uuid.uuid4().hex[:6]}"
    src = write_rows(tmp_path / f"{tag}.jsonl", rows_of(cstack, tag, 2))
    batch = json.loads(cli(cstack, "submit", str(src), "--json").stdout)
    file_id = batch["input_file_id"]

    res = cli(cstack, "files", "list")
    assert res.returncode == 0, res
    assert res.stdout.splitlines()[0].split() == ["ID", "PURPOSE", "BYTES", "CREATED", "FILENAME"]
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith(file_id))
    assert row.split()[1] == "batch" and row.endswith(f"{tag}.jsonl"), row
    page = json.loads(cli(cstack, "files", "list", "--json", "--purpose", "batch").stdout)
    assert file_id in [f["id"] for f in page["data"]] and page["object"] == "list"

    res = cli(cstack, "files", "get", file_id)
    assert re.search(rf"^filename:\s+{tag}\.jsonl$", res.stdout, re.MULTILINE), res.stdout
    assert re.search(rf"^bytes:\s+{src.stat().st_size} ", res.stdout, re.MULTILINE), res.stdout
    obj = json.loads(cli(cstack, "files", "get", file_id, "--json").stdout)
    assert obj["id"] == file_id and obj["bytes"] == src.stat().st_size

    # download: default name in the working directory, an explicit path, and stdout
    work = tmp_path / "work"
    work.mkdir()
    res = cli(cstack, "files", "download", file_id, cwd=work)
    assert res.returncode == 0 and (work / f"{tag}.jsonl").read_bytes() == src.read_bytes(), res
    assert res.stdout.startswith(f"saved {file_id} to {tag}.jsonl")
    res = cli(cstack, "files", "download", file_id, "-o", str(tmp_path / "x" / "copy.jsonl"), "--json")
    assert json.loads(res.stdout)["id"] == file_id and (tmp_path / "x" / "copy.jsonl").read_bytes() == src.read_bytes()
    res = cli(cstack, "files", "download", file_id, "-o", "-")
    assert res.stdout == src.read_text()

    cstack.wait_for_batch(batch["id"])
    res = cli(cstack, "files", "delete", file_id)
    assert res.returncode == 0 and res.stdout.strip() == f"deleted {file_id}", res
    res = cli(cstack, "files", "get", file_id)
    assert res.returncode == 1 and "No such File" in res.stderr, res
    out = json.loads(cli(cstack, "batches", "get", batch["id"], "--json").stdout)["output_file_id"]
    deleted = json.loads(cli(cstack, "files", "delete", out, "--json").stdout)
    assert deleted == {"id": out, "object": "file", "deleted": True}


# --------------------------------------------------------------------------------------------
# Ctrl-C while waiting


def _start_waiting(stack, tmp_path, tag: str, **popen_kwargs) -> tuple[subprocess.Popen, Path]:
    # The lines wait at the mock's gate named ``tag``: the batch runs until the test releases it.
    src = write_rows(tmp_path / f"{tag}.jsonl", rows_of(stack, tag, 30, mock_hold=tag))
    proc = processes.popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "submit",
            str(src),
            "--wait",
            "--out",
            str(tmp_path / "o"),
            "--poll-interval",
            "0.2",
        ],
        env=client_env(stack),
        cwd=str(ROOT),
        **popen_kwargs,
    )
    return proc, src


def test_ctrl_c_on_a_pipe_prints_how_to_cancel(cstack, tmp_path, wait_until):
    err_path = tmp_path / "stderr.txt"
    tag = f"ci-{uuid.uuid4().hex[:6]}"
    with open(err_path, "wb") as err:
        proc, _ = _start_waiting(cstack, tmp_path, tag, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        m = wait_until(
            lambda: re.search(r"(batch_\w+) in_progress", err_path.read_text()),
            timeout=30,
            message=lambda: f"the batch to be in progress; stderr: {err_path.read_text()}",
        )
        batch_id = m.group(1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    text = err_path.read_text()
    assert f"sluice batches cancel {batch_id}" in text and "keeps running" in text, text
    assert "Traceback" not in text
    assert cstack.client().batches.retrieve(batch_id).status == "in_progress", "not cancelled"
    cstack.client().batches.cancel(batch_id)
    cstack.mock().release(tag)
    cstack.wait_for_batch(batch_id, timeout=60)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_ctrl_c_on_a_terminal_offers_to_cancel(cstack, tmp_path, wait_until):
    import pty  # noqa: F401  (posix only)

    primary, secondary = os.openpty()
    tag = f"ct-{uuid.uuid4().hex[:6]}"
    proc, _ = _start_waiting(cstack, tmp_path, tag, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    seen = bytearray()

    def read_some() -> str:
        import select

        while select.select([primary], [], [], 0)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen.extend(chunk)
        return seen.decode(errors="replace")

    try:
        m = wait_until(
            lambda: re.search(r"(batch_\w+) in_progress", read_some()),
            timeout=30,
            message=lambda: f"progress on the terminal: {seen[-2000:]!r}",
        )
        batch_id = m.group(1)
        assert "\r" in read_some(), "a terminal gets a line redrawn in place"
        proc.send_signal(signal.SIGINT)
        wait_until(
            lambda: f"Cancel batch {batch_id}? [y/N]" in read_some(),
            timeout=15,
            message=lambda: f"the prompt: {seen[-2000:]!r}",
        )
        os.write(primary, b"y\n")
        wait_until(
            lambda: cstack.client().batches.retrieve(batch_id).status in ("cancelling", "cancelled"),
            timeout=60,
            message="the client's cancel to reach the server",
        )
        cstack.mock().release(tag)  # the held lines may finish now; the others end batch_cancelled
        wait_until(
            lambda: proc.poll() is not None and (read_some() or True),
            timeout=60,
            message=lambda: f"the client to end: {seen[-2000:]!r}",
        )
        read_some()
        text = seen.decode(errors="replace")
        assert proc.returncode == 1, text
        assert re.search(rf"{batch_id} cancelled: \d+ completed, \d+ failed of 30", text), text
        assert cstack.client().batches.retrieve(batch_id).status == "cancelled"
        errors = tmp_path / "o" / f"{batch_id}_error.jsonl"
        assert (
            errors.exists()
            and len(custom_ids(errors))
            + (
                len(custom_ids(tmp_path / "o" / f"{batch_id}_output.jsonl"))
                if (tmp_path / "o" / f"{batch_id}_output.jsonl").exists()
                else 0
            )
            == 30
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)


def test_wait_follows_the_event_stream_when_the_server_has_one(cstack, tmp_path):
    probe = cstack.http("GET", "/v1/batches/batch_000000000001aaaaaaaaaaaa/events")
    if "json" not in probe.content_type:  # a route-less 404 is text: no event stream on this server
        pytest.skip("this server has no GET /v1/batches/{id}/events")
    tag = f"ev-{uuid.uuid4().hex[:6]}"
    src = write_rows(tmp_path / "r.jsonl", rows_of(cstack, tag, 5, mock_latency_ms=300))
    # Polling every hour would never finish within the deadline; the event stream wakes the client as
    # the batch moves (in seconds, however busy the machine).
    res = cli(
        cstack, "submit", str(src), "--wait", "--out", str(tmp_path / "o"), "--poll-interval", "3600", timeout=150
    )
    assert res.returncode == 0, res
    m = SUMMARY.match(res.stdout.strip().splitlines()[-1])
    assert m and m.group(2) == "completed" and m.group(3) == "5", res.stdout
    assert sorted(custom_ids(tmp_path / "o" / f"{m.group(1)}_output.jsonl")) == [f"{tag}-{i:03d}" for i in range(5)]


# --------------------------------------------------------------------------------------------
# A newcomer's stumbles (issue 13), each as it looks from the shell


def test_list_options_need_no_word_list(cstack, tmp_path):
    token = cstack.tokens[1]
    for i in range(3):
        src = write_rows(tmp_path / f"l{i}.jsonl", rows_of(cstack, f"lo{i}-{uuid.uuid4().hex[:6]}", 1))
        assert cli(cstack, "submit", str(src), "--json", token=token).returncode == 0
    res = cli(cstack, "batches", "--limit", "2", token=token)
    assert res.returncode == 0, res
    assert len(res.stdout.splitlines()) == 3, res.stdout  # header + 2
    assert "(more: sluice batches --after batch_" in res.stderr, res.stderr
    res = cli(cstack, "files", "--purpose", "batch", "--limit", "1", "--json", token=token)
    assert res.returncode == 0, res
    page = json.loads(res.stdout)
    assert len(page["data"]) == 1 and page["data"][0]["purpose"] == "batch" and page["has_more"]


def test_download_never_overwrites_without_force(cstack, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    tag = f"ow-{uuid.uuid4().hex[:6]}"
    mine = write_rows(work / "requests.jsonl", rows_of(cstack, tag, 2))
    uploaded = mine.read_bytes()
    file_id = json.loads(cli(cstack, "submit", str(mine), "--json").stdout)["input_file_id"]
    mine.write_text("my own edits\n")  # the server's copy has the same name
    res = cli(cstack, "files", "download", file_id, cwd=work)
    assert res.returncode == 1, res
    assert res.stderr.strip() == (
        "sluice: requests.jsonl exists already; not overwriting it (pass --force to "
        "replace it, or -o to save elsewhere)"
    ), res.stderr
    assert mine.read_text() == "my own edits\n"
    assert not list(work.glob("*.part"))
    res = cli(cstack, "files", "download", file_id, "--force", cwd=work)
    assert res.returncode == 0 and mine.read_bytes() == uploaded, res


def test_closed_pipe_exits_quietly(cstack, tmp_path):
    src = write_rows(tmp_path / "p.jsonl", rows_of(cstack, f"cp-{uuid.uuid4().hex[:6]}", 1))
    file_id = json.loads(cli(cstack, "submit", str(src), "--json").stdout)["input_file_id"]
    for args in (
        ["batches", "--limit", "5"],
        ["files", "download", file_id, "-o", "-"],
        [
            "batches",
            "get",
            "--json",
            json.loads(cli(cstack, "batches", "--limit", "1", "--json").stdout)["data"][0]["id"],
        ],
    ):
        read_end, write_end = os.pipe()
        os.close(read_end)  # like `| head` that has already gone
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "service.cli", *args],
                env=client_env(cstack),
                cwd=str(ROOT),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert proc.returncode == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, (args, proc.stderr)


def test_unreachable_redis_and_server_are_one_line(cstack, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {**client_env(cstack), "REDIS_URL": dead}
    for args in (["tokens", "list"], ["tokens", "create", "--name", "x"], ["status"]):
        proc = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, (args, proc)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert f"127.0.0.1:{dead.split(':')[2].split('/')[0]}" in proc.stderr, proc.stderr
    res = cli(cstack, "batches", url=f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "cannot reach Sluice" in res.stderr, res


def test_a_batch_refused_by_a_quota_leaves_no_file_behind(cstack, tmp_path):
    name = f"q-{uuid.uuid4().hex[:6]}"
    created = cstack.sluice("tokens", "create", "--name", name, "--max-enqueued-lines", "2", check=True)
    token = created.stdout.strip()
    src = write_rows(tmp_path / "q.jsonl", rows_of(cstack, name, 3))
    for extra in ([], ["--wait", "--out", str(tmp_path / "o")]):
        res = cli(cstack, "submit", str(src), *extra, token=token)
        assert res.returncode == 1, res
        assert "the batch was refused" in res.stderr and "enqueued_lines_quota_exceeded" in res.stderr, res.stderr
        assert re.search(r"deleted the uploaded file file-\w+: nothing is left on the server", res.stderr), res.stderr
        assert json.loads(cli(cstack, "files", "--json", token=token).stdout)["data"] == [], "the upload is gone"
    assert not list((tmp_path / "o").glob("*")), "a job that never ran leaves no state file"


# --------------------------------------------------------------------------------------------
# Jobs bigger than one batch: split, merged, resumable

SMALL_LINES = 40  # requests per batch on the small stack
SMALL_BYTES = 20_000  # bytes per batch file on the small stack


@pytest.fixture(scope="module")
def small(module_stack_factory):
    return module_stack_factory.start(
        name="small-batches",
        workers=1,
        worker_concurrency=16,
        max_batch_lines=SMALL_LINES,
        env={"SLUICE_MAX_BATCH_FILE_BYTES": str(SMALL_BYTES)},
    )


def job_batches(stack, job_id: str) -> list[dict]:
    found, after = [], None
    while True:
        page = stack.http("GET", "/v1/batches?limit=100" + (f"&after={after}" if after else "")).json()
        found += [b for b in page["data"] if (b.get("metadata") or {}).get("sluice_job") == job_id]
        if not page["has_more"]:
            return found
        after = page["last_id"]


JOB_SUMMARY = re.compile(r"^(job_\w+) (\w+): (\d+) completed, (\d+) failed of (\d+) in [\d:]+ \((\d+) batches\); (.*)$")


def test_a_job_bigger_than_one_batch_is_split_and_merged_exactly_once(small, tmp_path):
    tag = f"sp-{uuid.uuid4().hex[:6]}"
    rows = rows_of(small, tag, 130) + [small.chat_line(f"{tag}-bad{i}", "x", mock_status=404) for i in range(3)]
    src = write_rows(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    res = cli(small, "submit", str(src), "--wait", "--out", str(out), "--poll-interval", "0.2", timeout=120)
    assert res.returncode == 0, res
    m = JOB_SUMMARY.match(res.stdout.strip().splitlines()[-1])
    assert m, res.stdout
    job_id = m.group(1)
    assert m.group(2, 3, 4, 5, 6) == ("completed", "130", "3", "133", "4"), res.stdout
    assert "runs it as 4 batches" in res.stderr, res.stderr
    output, errors = out / f"{job_id}_output.jsonl", out / f"{job_id}_error.jsonl"
    got = custom_ids(output) + custom_ids(errors)
    assert sorted(got) == sorted(r["custom_id"] for r in rows), "every custom_id exactly once"
    assert sorted(custom_ids(errors)) == [f"{tag}-bad{i}" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted([output.name, errors.name]), "the state file is gone"
    parts = job_batches(small, job_id)
    assert len(parts) == 4 and all(b["status"] == "completed" for b in parts)
    assert sorted(b["metadata"]["sluice_part"] for b in parts) == ["1/4", "2/4", "3/4", "4/4"]
    assert max(b["request_counts"]["total"] for b in parts) <= SMALL_LINES


def test_a_job_is_split_by_bytes_too(small, tmp_path):
    tag = f"sb-{uuid.uuid4().hex[:6]}"
    rows = [small.chat_line(f"{tag}-{i}", "y" * 900) for i in range(30)]  # about 1 KB each: 30 KB in all
    src = write_rows(tmp_path / "wide.jsonl", rows)
    res = cli(
        small,
        "submit",
        str(src),
        "--wait",
        "--out",
        str(tmp_path / "o"),
        "--poll-interval",
        "0.2",
        "--json",
        timeout=120,
    )
    assert res.returncode == 0, res
    job = json.loads(res.stdout)
    assert job["object"] == "sluice.job" and job["status"] == "completed" and len(job["batches"]) >= 2, job
    assert job["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    sizes = [small.client().files.retrieve(b["input_file_id"]).bytes for b in job_batches(small, job["id"])]
    assert len(sizes) == len(job["batches"]) and max(sizes) <= SMALL_BYTES and sum(sizes) == src.stat().st_size
    assert sorted(custom_ids(Path(job["output_file"]))) == sorted(r["custom_id"] for r in rows)


def test_duplicate_custom_ids_across_parts_are_refused_before_upload(small, tmp_path):
    tag = f"du-{uuid.uuid4().hex[:6]}"
    rows = rows_of(small, tag, 100)
    rows[90] = rows[5]  # in another part than its first use
    src = write_rows(tmp_path / "dup.jsonl", rows)
    before = cli(small, "files", "--json").stdout
    res = cli(small, "submit", str(src), "--wait", "--out", str(tmp_path / "o"))
    assert res.returncode == 1, res
    assert "1 invalid line in" in res.stderr and "(nothing was uploaded)" in res.stderr, res.stderr
    assert "line 91: duplicate_custom_id [custom_id]" in res.stderr, res.stderr
    assert f'> {{"custom_id": "{tag}-005"' in res.stderr, res.stderr
    assert cli(small, "files", "--json").stdout == before, "nothing was uploaded"


def test_too_many_lines_without_wait_says_how_to_split(small, tmp_path):
    src = write_rows(tmp_path / "many.jsonl", rows_of(small, f"tm-{uuid.uuid4().hex[:6]}", SMALL_LINES + 1))
    res = cli(small, "submit", str(src))
    assert res.returncode == 2, res
    assert (
        f"holds {SMALL_LINES + 1} requests, more than one batch may on this server ({SMALL_LINES} requests"
        in res.stderr
        and "--wait --out DIR" in res.stderr
    ), res.stderr


def test_a_file_with_too_many_lines_is_reported_as_such(small, tmp_path):
    # Created through the SDK, as the server refuses it: the CLI shows why, not "1 invalid line".
    f, batch = small.submit([small.chat_line(f"tl-{i}", "x") for i in range(SMALL_LINES + 5)])
    small.wait_for_batch(batch.id)
    res = cli(small, "batches", "get", batch.id)
    assert res.returncode == 0, res
    assert "invalid line" not in res.stdout, res.stdout
    assert (
        f"the file as a whole (nothing was sent upstream): too_many_tasks: The batch input file has more than "
        f"{SMALL_LINES} requests."
    ) in res.stdout, res.stdout


def test_submit_resumes_after_sigkill_without_rerunning_anything(small, tmp_path, wait_until):
    tag = f"rs-{uuid.uuid4().hex[:6]}"
    rows = rows_of(small, tag, 5 * SMALL_LINES, mock_latency_ms=300)
    src = write_rows(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    small.mock_reset()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "submit",
            str(src),
            "--wait",
            "--out",
            str(out),
            "--parallel",
            "2",
            "--poll-interval",
            "0.2",
        ],
        env=client_env(small),
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def some_merged_some_not():
            states = list(out.glob("job_*.submit.json"))
            if not states:
                return None
            parts = json.loads(states[0].read_text())["parts"]
            merged = sum(p["merged"] for p in parts)
            return states[0] if 0 < merged < len(parts) else None

        state_file = wait_until(
            some_merged_some_not, timeout=90, interval=0.05, message="a job with some parts merged and some not"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    job_id = state_file.name.split(".")[0]
    res = cli(small, "submit", "--resume", "--out", str(out), "--poll-interval", "0.2", timeout=120)
    assert res.returncode == 0, res
    assert f"resuming {job_id}" in res.stderr, res.stderr
    m = JOB_SUMMARY.match(res.stdout.strip().splitlines()[-1])
    assert m and m.group(1) == job_id and m.group(2, 3, 4, 5, 6) == ("completed", "200", "0", "200", "5"), res.stdout
    assert sorted(custom_ids(out / f"{job_id}_output.jsonl")) == sorted(r["custom_id"] for r in rows), (
        "every custom_id exactly once"
    )
    assert len(job_batches(small, job_id)) == 5, "no part ran twice"
    assert small.mock_stats()["requests"] == 200, "no request was sent twice"
    assert not state_file.exists()
    res = cli(small, "submit", "--resume", "--out", str(out))
    assert res.returncode == 2 and "nothing to resume" in res.stderr, res


def test_a_job_waits_for_its_own_batches_when_a_quota_is_full(small, tmp_path):
    name = f"qj-{uuid.uuid4().hex[:6]}"
    token = small.sluice("tokens", "create", "--name", name, "--max-active-batches", "1", check=True).stdout.strip()
    rows = rows_of(small, name, 3 * SMALL_LINES)
    src = write_rows(tmp_path / "q.jsonl", rows)
    res = cli(
        small,
        "submit",
        str(src),
        "--wait",
        "--out",
        str(tmp_path / "o"),
        "--poll-interval",
        "0.2",
        token=token,
        timeout=120,
    )
    assert res.returncode == 0, res
    assert "waits for a batch of this job to end (active_batches_quota_exceeded)" in res.stderr, res.stderr
    m = JOB_SUMMARY.match(res.stdout.strip().splitlines()[-1])
    assert m and m.group(2, 5, 6) == ("completed", str(3 * SMALL_LINES), "3"), res.stdout
    assert sorted(custom_ids(tmp_path / "o" / f"{m.group(1)}_output.jsonl")) == sorted(r["custom_id"] for r in rows)
    files = json.loads(cli(small, "files", "--purpose", "batch", "--json", token=token).stdout)["data"]
    assert len(files) == 3, "each part uploaded once"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_cancelling_a_job_on_a_terminal_accounts_for_every_line(small, tmp_path, wait_until):
    import select

    tag = f"cj-{uuid.uuid4().hex[:6]}"
    rows = rows_of(small, tag, 3 * SMALL_LINES, mock_latency_ms=2000)
    src = write_rows(tmp_path / "c.jsonl", rows)
    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "submit",
            str(src),
            "--wait",
            "--out",
            str(tmp_path / "o"),
            "--parallel",
            "1",
            "--poll-interval",
            "0.2",
        ],
        env=client_env(small),
        cwd=str(ROOT),
        start_new_session=True,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    seen = bytearray()

    def read_some() -> str:
        while select.select([primary], [], [], 0)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen.extend(chunk)
        return seen.decode(errors="replace")

    try:
        wait_until(
            lambda: re.search(r"job_\w+ in_progress: [1-9]", read_some()),
            timeout=60,
            message=lambda: f"the job under way: {seen[-2000:]!r}",
        )
        proc.send_signal(signal.SIGINT)
        wait_until(
            lambda: "running batches, 2 not started)? [y/N]" in read_some(),
            timeout=15,
            message=lambda: f"the prompt: {seen[-2000:]!r}",
        )
        os.write(primary, b"y\n")
        wait_until(
            lambda: proc.poll() is not None and (read_some() or True),
            timeout=90,
            message=lambda: f"the client to end: {seen[-2000:]!r}",
        )
        read_some()
        text = seen.decode(errors="replace")
        assert proc.returncode == 1, text
        m = re.search(r"(job_\w+) cancelled: (\d+) completed, (\d+) failed of (\d+)", text)
        assert m and int(m.group(2)) + int(m.group(3)) == int(m.group(4)) == len(rows), text
        out = tmp_path / "o" / f"{m.group(1)}_output.jsonl"
        errors = tmp_path / "o" / f"{m.group(1)}_error.jsonl"
        got = (custom_ids(out) if out.exists() else []) + custom_ids(errors)
        assert sorted(got) == sorted(r["custom_id"] for r in rows), "every custom_id exactly once"
        codes = [json.loads(line)["error"]["code"] for line in errors.read_text().splitlines()]
        assert codes.count("batch_cancelled") >= 2 * SMALL_LINES, "the parts that never ran are accounted for"
        assert len(job_batches(small, m.group(1))) == 1, "no part started after the cancel"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
