"""No process the suite or the benchmark starts outlives them.

Each test runs an inner pytest session (with this suite's ``tests/conftest.py`` as a plugin) or the
benchmark as a child, makes it misbehave (leak a process, time out, get SIGKILLed), and checks what
is left afterwards by scanning /proc.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.support import processes
from tests.support.env import base_env
from tests.support.processes import ROOT, RUN_MARKER_VAR
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

# Failure deadlines only: an inner session takes a few seconds.
INNER_TIMEOUT_S = 180


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(entry))
    return found


def _inner_session(tmp_path: Path, test_source: str) -> Path:
    """A directory holding one inner test module that uses this suite's conftest as a plugin."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (inner / "test_inner.py").write_text(textwrap.dedent(test_source))
    return inner


def _pytest_cmd(inner: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(inner),
        "-o",
        "timeout_method=signal",
        "-o",
        "timeout_func_only=false",
        str(inner),
    ]


def _inner_env() -> dict[str, str]:
    return {**base_env(), "PYTHONPATH": str(ROOT)}


def test_a_leaked_process_fails_the_session_and_is_killed(tmp_path):
    pid_file = tmp_path / "leaked.pid"
    inner = _inner_session(
        tmp_path,
        f"""
        import subprocess, sys

        def test_starts_a_process_and_forgets_it():
            # Outside every runner, in a session of its own: only the end-of-session scan finds it.
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
            open({str(pid_file)!r}, "w").write(str(p.pid))
    """,
    )
    done = processes.run(_pytest_cmd(inner), env=_inner_env(), cwd=inner, timeout=INNER_TIMEOUT_S)
    output = done.stdout + done.stderr
    leaked = int(pid_file.read_text())
    assert done.returncode == 1, f"the session passed although it leaked a process:\n{output}"
    assert "1 passed" in output and "leaked processes" in output, output
    assert f"pid {leaked}:" in output, output
    wait_until(lambda: not _alive(leaked), timeout=30, message=f"leaked pid {leaked} to be gone")


def test_a_timed_out_test_still_stops_its_whole_process_group(tmp_path):
    pid_file = tmp_path / "group.pid"
    inner = _inner_session(
        tmp_path,
        f"""
        import time
        import pytest

        @pytest.mark.timeout(3)
        def test_hangs(process_runner):
            # The shell's own child stays in the group the runner signals.
            p = process_runner.start("sleepers", ["sh", "-c", "sleep 600 & sleep 600"])
            open({str(pid_file)!r}, "w").write(str(p.pid))
            time.sleep(600)
    """,
    )
    done = processes.run(_pytest_cmd(inner), env=_inner_env(), cwd=inner, timeout=INNER_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Timeout" in output, output
    assert "leaked processes" not in output, output
    group = int(pid_file.read_text())
    wait_until(
        lambda: not _group_members(group),
        timeout=30,
        message=lambda: f"process group {group} to be empty: {_group_members(group)}",
    )


def test_processes_die_with_a_harness_killed_outright(tmp_path, process_runner):
    pid_file = tmp_path / "child.pid"
    inner = _inner_session(
        tmp_path,
        f"""
        import sys, time

        def test_gets_killed(process_runner):
            p = process_runner.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(pid_file)!r}, "w").write(str(p.pid))
            time.sleep(600)
    """,
    )
    session = process_runner.start("inner-pytest", _pytest_cmd(inner), env=_inner_env(), cwd=inner, oneshot=True)
    wait_until(
        lambda: pid_file.exists() and pid_file.read_text(),
        timeout=INNER_TIMEOUT_S,
        message=lambda: f"the inner test to start its process; its log:\n{session.tail()}",
    )
    child = int(pid_file.read_text())
    assert _alive(child)
    # SIGKILL the inner pytest alone: no teardown, no exit handler runs. The kernel's parent-death
    # signal is what stops its child (which lives in a session of its own).
    os.kill(session.pid, signal.SIGKILL)
    wait_until(lambda: not _alive(child), timeout=30, message=f"pid {child} to die with its parent")


@pytest.mark.timeout(INNER_TIMEOUT_S + 60)
def test_a_killed_benchmark_takes_its_stack_with_it(tmp_path, process_runner):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    # A marker of our own extends the session's, so the bench's descendants can be told apart.
    token = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**base_env(), RUN_MARKER_VAR: f"{os.environ[RUN_MARKER_VAR]}:{token}"}
    # Far more lines than can finish before the kill: the stack is certainly up when we look.
    bench = process_runner.start(
        "bench",
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            "--scenario",
            "latency",
            "--lines",
            "200000",
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        oneshot=True,
    )

    def stack_running() -> bool:
        names = " ".join(processes.leftover_processes(token).values())
        return "redis-server" in names and "service.cli worker" in names

    wait_until(
        stack_running,
        timeout=INNER_TIMEOUT_S,
        interval=0.1,
        message=lambda: f"the benchmark's stack to run; its log:\n{bench.tail()}",
    )
    os.kill(bench.pid, signal.SIGKILL)
    wait_until(
        lambda: not processes.leftover_processes(token),
        timeout=30,
        message=lambda: f"the benchmark's processes to die with it: {processes.leftover_processes(token)}",
    )
