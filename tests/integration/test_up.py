"""``sluice up`` as a newcomer runs it (issue 13): the stack file the other commands find it by, and Ctrl-C.

Each test starts ``sluice up`` in a directory of its own (so its ``var/data`` is that test's), on a free
port, with no REDIS_URL / SLUICE_* in its environment, through a ProcessRunner: it runs in its own process
group and dies with the test. The children ``sluice up`` starts run in sessions of their own, and die with
it (Linux parent-death signal) if it is killed outright; the teardown kills any that would not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from service.core import keys
from tests.conftest import (
    _base_env,
    chat_line,
    free_port,
    http_request,
    to_jsonl,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STOP_ORDER = [
    "up_stopping",
    "web_stopped",
    "worker_stopped",
    "finalizer_stopped",
    "mock_provider_stopped",
    "redis_stopped",
    "up_stopped",
]


class Up:
    """A ``sluice up`` started by a test, in ``workdir``."""

    def __init__(self, runner, workdir: Path, *, grace_s: float = 5.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        env = {**_base_env(), "PORT": str(self.port), "SLUICE_SHUTDOWN_GRACE_S": str(grace_s)}
        self.proc = runner.start(f"up-{self.port}", [sys.executable, "-m", "service.cli", "up"], env=env, cwd=workdir)
        self.stack_file = workdir / "var" / "data" / "stack.json"
        self.stack = wait_until(
            self._stack,
            timeout=60,
            interval=0.1,
            check=runner.check_alive,
            message=lambda: f"sluice up to write {self.stack_file}:\n{self.proc.tail()}",
        )

    def _stack(self) -> dict | None:
        try:
            return json.loads(self.stack_file.read_text())
        except (OSError, ValueError):
            return None

    def children(self) -> dict[str, int]:
        return self.stack["processes"]

    def log_events(self) -> list[dict]:
        events = []
        for line in self.proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def sluice(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """The CLI as a user runs it beside `sluice up`: same directory, nothing set."""
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env={**_base_env(), **(env or {})},
            cwd=str(self.workdir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def kill_leftovers(self) -> None:
        for pid in self.children().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purpose (its parent, `sluice up`, has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_status_tokens_and_the_client_find_the_stack_by_themselves(process_runner, tmp_path):
    up = Up(process_runner, tmp_path)
    try:
        banner = up.proc.tail(200)
        api = f"http://localhost:{up.port}"
        for needle in (
            f"{api}/v1",
            f"Dashboard:  {api}/dashboard/",
            f"Token:      {up.stack['token']}",
            "submit requests.jsonl --wait --out results/",
        ):
            assert needle in banner, banner
        assert up.stack["api_url"] == api and up.stack["redis_url"].startswith("redis://127.0.0.1:")
        assert up.stack_file.stat().st_mode & 0o777 == 0o600
        # The children are in sessions of their own: a Ctrl-C at the terminal reaches `sluice up` only.
        assert all(os.getpgid(pid) != os.getpgid(up.proc.pid) for pid in up.children().values())

        status = wait_until(
            lambda: (r := up.sluice("status")).returncode == 0 and "workers live: 1" in r.stdout and r,
            timeout=30,
            message="sluice status to see the stack's worker",
        )
        assert f"using Redis {up.stack['redis_url']} of the `sluice up` stack (pid {up.proc.pid}" in status.stderr
        assert "no provider configured" not in status.stdout and "default" in status.stdout, status.stdout

        name = f"t-{uuid.uuid4().hex[:6]}"
        created = up.sluice("tokens", "create", "--name", name)
        assert created.returncode == 0, created
        r = redis.Redis.from_url(up.stack["redis_url"], socket_timeout=5)
        try:
            assert r.hexists(keys.TOKEN_NAMES, name), "the token went to the stack's Redis"
        finally:
            r.close()
        listed = up.sluice("tokens", "list")
        assert name in listed.stdout and "of the `sluice up` stack" in listed.stderr, listed

        # The client: no SLUICE_URL, no SLUICE_TOKEN.
        (tmp_path / "requests.jsonl").write_bytes(to_jsonl([chat_line("q1", "Hello"), chat_line("q2", "Bonjour")]))
        res = up.sluice("submit", "requests.jsonl", "--wait", "--out", "results")
        assert res.returncode == 0, res
        assert f"using {api} of the `sluice up` stack" in res.stderr, res.stderr
        assert "completed: 2 completed, 0 failed of 2" in res.stdout, res.stdout
        # The stack's token works for a token made at run time too.
        managed = created.stdout.strip()
        assert http_request("GET", f"{api}/v1/batches", token=managed).status == 200
    finally:
        process_runner.stop([up.proc])
        up.kill_leftovers()


def test_ctrl_c_stops_the_stack_in_order_without_warnings(process_runner, tmp_path):
    up = Up(process_runner, tmp_path, grace_s=5.0)
    api = f"http://localhost:{up.port}"
    token = up.stack["token"]
    rows = [chat_line(f"c{i:03d}", "x", mock_latency_ms=1000) for i in range(100)]
    try:
        f = json.loads(_upload(api, token, to_jsonl(rows)))
        batch = http_request(
            "POST",
            f"{api}/v1/batches",
            token=token,
            json_body={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()

        def in_flight() -> bool:
            b = http_request("GET", f"{api}/v1/batches/{batch['id']}", token=token).json()
            return b["status"] == "in_progress" and b["request_counts"]["completed"] >= 1

        wait_until(in_flight, timeout=60, interval=0.1, message="the batch to be under way")

        up.proc.popen.send_signal(signal.SIGINT)  # to `sluice up` only, as the terminal now does
        assert up.proc.popen.wait(timeout=120) == 0, up.proc.tail()
        up.proc.stopping = True
    finally:
        process_runner.stop([up.proc])
    try:
        events = up.log_events()
        names = [e["event"] for e in events]
        order = [names.index(n) for n in STOP_ORDER if n in names]
        assert [n for n in STOP_ORDER if n in names] == STOP_ORDER, names
        assert order == sorted(order), f"stopped out of order: {[names[i] for i in sorted(order)]}"
        noisy = [e for e in events if e.get("level") in ("warning", "error", "critical")]
        assert not noisy, noisy
        text = up.proc.log_path.read_text(errors="replace")
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
        assert all(_gone(pid) for pid in up.children().values()), "every child is stopped"
        assert not up.stack_file.exists(), "the stack file goes with the stack"
    finally:
        up.kill_leftovers()

    # Redis stopped last, after the worker recorded what it had: the batch goes on where it stopped.
    again = Up(process_runner, tmp_path, grace_s=5.0)
    api = f"http://localhost:{again.port}"
    assert again.stack["token"] == token, "the dev token survives a restart"
    try:

        def finished():
            b = http_request("GET", f"{api}/v1/batches/{batch['id']}", token=token).json()
            return b if b["status"] == "completed" else None

        done = wait_until(finished, timeout=120, interval=0.2, message="the batch to complete after the restart")
        assert done["request_counts"] == {"total": 100, "completed": 100, "failed": 0}
        out = http_request("GET", f"{api}/v1/files/{done['output_file_id']}/content", token=token).body.decode()
        ids = [json.loads(line)["custom_id"] for line in out.splitlines()]
        assert sorted(ids) == sorted(r["custom_id"] for r in rows), "every line exactly once"
    finally:
        process_runner.stop([again.proc])
        again.kill_leftovers()


def _upload(api: str, token: str, data: bytes) -> bytes:
    boundary = "b" + uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="r.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    res = http_request(
        "POST",
        f"{api}/v1/files",
        token=token,
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert res.status == 200, res.body
    return res.body


def test_a_second_sluice_up_on_the_same_data_dir_is_refused(process_runner, tmp_path):
    up = Up(process_runner, tmp_path)
    try:
        other = subprocess.run(
            [sys.executable, "-m", "service.cli", "up"],
            cwd=str(tmp_path),
            env={**_base_env(), "PORT": str(free_port())},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode != 0 and f"another `sluice up` (pid {up.proc.pid})" in other.stderr, other
    finally:
        process_runner.stop([up.proc])
        up.kill_leftovers()
