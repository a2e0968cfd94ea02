"""Deployment: the Procfile under honcho, the buildpack's install, and deploy/ kept consistent.

- ``test_procfile_runs_under_honcho``: ``honcho start`` runs the repository's Procfile unchanged
  with nothing but a ``.env`` (a private redis-server and mock provider) and completes a batch
  through the SDK; then it is restarted (as an upgrade would) while lines are in flight: on
  SIGTERM every process it started drains and exits by itself, before honcho's own SIGKILL
  deadline, lines that outlast the grace are handed back, and after the restart the batch
  completes with every line exactly once.
- ``test_buildpack_install``: a fresh virtualenv, a copy of the working tree, and
  ``pip install -r requirements.txt`` run from the app root, as Heroku's Python buildpack does.
- ``test_deploy_files_agree_*``: process types in the Procfile, ``deploy/app.json``'s formation
  and the systemd units are the same; every variable they name is one Sluice reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import processes
from tests.support.http import http_request
from tests.support.lines import chat_line, parse_jsonl, to_jsonl
from tests.support.mocks import MockSpec, start_mock
from tests.support.ports import free_port
from tests.support.processes import ROOT, ProcessRunner
from tests.support.redis_server import start_redis
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration]

DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
# honcho sends SIGKILL this long after SIGTERM (honcho.manager.KILL_WAIT, 5 s): the grace we give
# Sluice under honcho must fit in it, as SLUICE_SHUTDOWN_GRACE_S must fit in a platform's 30 s.
HONCHO_KILL_WAIT_S = 5.0
GRACE_S = 2
# The test runs honcho with a longer SIGKILL deadline, so that a loaded machine's slow exits are not
# mistaken for a drain that overran: whether every process still stops by itself, well within it,
# is what is checked (and GRACE_S against honcho's real deadline, statically).
TEST_KILL_WAIT_S = 60.0
STOP_BOUND_S = 30.0
# Handed-back lines are taken at once, not after a lease: a lease far longer than the wait shows it.
LEASE_S = 600
STANDARD_VARS = {"REDIS_URL", "PORT"}


# --------------------------------------------------------------------------------------------
# helpers


def _procfile_types() -> list[str]:
    types = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            types.append(line.split(":", 1)[0].strip())
    return types


def _process_groups() -> dict[int, int]:
    """pid -> process group id of every process we can see (from /proc, not by name)."""
    return {pid: int(fields[2]) for pid, fields in processes.proc_stats().items() if fields[0] != "Z"}


def _members(pgids: set[int]) -> set[int]:
    return {pid for pid, pgid in _process_groups().items() if pgid in pgids}


def _clean_env() -> dict[str, str]:
    """The test's environment without any Sluice configuration: the .env must supply it all."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLUICE_", "OPENAI_", "HONCHO_")) and k not in ("REDIS_URL", "PORT")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------
# honcho


class Honcho:
    """One ``honcho start`` of the repository's Procfile, unchanged, from the app root."""

    def __init__(self, exe: str, env_file: Path, out: Path, runner: ProcessRunner):
        self.out = out
        self.runner = runner
        self.pgids: set[int] = set()
        with open(out, "wb") as f:
            # Only honcho gets our SIGTERM, as a platform signals its process manager.
            self.popen = processes.popen(
                [*exe, "start", "-f", str(ROOT / "Procfile"), "-e", str(env_file), "-d", str(ROOT), "--no-colour"],
                cwd=str(ROOT),
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.out.read_bytes().decode(errors="replace")

    def check_alive(self) -> None:
        self.runner.check_alive()
        if self.popen.poll() is not None:
            raise AssertionError(f"honcho exited with {self.popen.returncode}:\n{self.output()[-4000:]}")

    def wait_started(self) -> dict[str, int]:
        def started() -> dict[str, int]:
            found = {k: int(v) for k, v in re.findall(r"(\w+)\.1 started \(pid=(\d+)\)", self.output())}
            return found if len(found) == len(_procfile_types()) else {}

        pids = wait_until(started, timeout=30, message="honcho to start every process type", check=self.check_alive)
        assert set(pids) == set(_procfile_types()), pids
        # honcho starts each process in a session of its own: its process group id is its pid.
        self.pgids = set(pids.values())
        return pids

    def stop(self, after_sigterm=lambda: None) -> float:
        """SIGTERM honcho (then call ``after_sigterm``); check every process drained and exited on its
        own; return the seconds taken."""
        members = _members(self.pgids)
        assert members, "no process found in the process groups honcho started"
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        after_sigterm()
        self.popen.wait(timeout=TEST_KILL_WAIT_S + 30)
        elapsed = time.monotonic() - t0
        text = self.output()
        assert "sending SIGKILL" not in text, f"honcho had to SIGKILL a process:\n{text[-4000:]}"
        assert elapsed < STOP_BOUND_S, f"stopping took {elapsed:.1f}s:\n{text[-4000:]}"
        # honcho's rc is the /bin/sh it ran the Procfile line with (killed by the same SIGTERM);
        # that sluice itself drained and stopped shows in its own last log line.
        for kind in _procfile_types():
            assert re.search(rf"{kind}\.1 stopped \(rc=", text), f"{kind} did not stop:\n{text[-4000:]}"
            assert re.search(rf"{kind}\.1 +\| .*\"{kind}_stopped\"", text), f"no {kind}_stopped:\n{text[-4000:]}"
        left = _members(self.pgids)
        assert not left, f"processes left behind: {sorted(left)} (were running: {sorted(members)})"
        return elapsed

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        for pgid in self.pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_batch(client, batch_id: str, check, timeout: float = 60):
    return wait_until(
        lambda: (
            (b := client.batches.retrieve(batch_id)).status in ("completed", "failed", "expired", "cancelled") and b
        ),
        timeout=timeout,
        interval=0.2,
        message=f"batch {batch_id} to finish under honcho",
        check=check,
        ignore=(OSError,),
    )


@pytest.mark.timeout(180)
def test_procfile_runs_under_honcho(tmp_path):
    try:
        import honcho.manager
    except ImportError:
        pytest.skip("honcho is not installed (it is in the test extra)")
    import openai

    # The grace must fit in honcho's real SIGKILL deadline, as SLUICE_SHUTDOWN_GRACE_S in a platform's.
    assert GRACE_S < honcho.manager.KILL_WAIT == HONCHO_KILL_WAIT_S
    # honcho itself, with only its SIGKILL deadline raised (see TEST_KILL_WAIT_S).
    exe = [
        sys.executable,
        "-c",
        "import sys, honcho.manager as m; from honcho.command import main; "
        f"m.KILL_WAIT = {TEST_KILL_WAIT_S}; sys.argv[0] = 'honcho'; sys.exit(main())",
    ]

    runner = ProcessRunner(tmp_path / "logs")
    runs: list[Honcho] = []
    try:
        redis = start_redis(runner, tmp_path / "redis")
        mock = start_mock(runner, "default", MockSpec(gates=True), env=_clean_env())
        mock.wait_ready(runner)

        web_port = free_port()
        token = "tok-honcho"
        env_file = tmp_path / ".env"
        env_file.write_text(
            "\n".join(
                [
                    f"REDIS_URL={redis.url}",
                    f"SLUICE_UPSTREAM_URL={mock.url}",
                    "SLUICE_UPSTREAM_API_KEY=upstream-secret",
                    f"SLUICE_API_TOKENS={token}",
                    f"SLUICE_DATA_DIR={tmp_path / 'data'}",
                    f"SLUICE_SHUTDOWN_GRACE_S={GRACE_S}",
                    f"SLUICE_LEASE_S={LEASE_S}",
                    # honcho gives the first process type PORT and each later one PORT + 100 (PORT in the
                    # .env wins over -p), so web, first in the Procfile, listens exactly here.
                    f"PORT={web_port}",
                    "",
                ]
            )
        )
        base = f"http://127.0.0.1:{web_port}"

        def start() -> Honcho:
            h = Honcho(exe, env_file, tmp_path / f"honcho-{len(runs) + 1}.out", runner)
            runs.append(h)
            h.wait_started()
            wait_until(
                lambda: http_request("GET", f"{base}/healthz", timeout=2).status == 200,
                timeout=30,
                interval=0.1,
                ignore=(OSError,),
                message=f"web under honcho on PORT={web_port}",
                check=h.check_alive,
            )
            return h

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=15)
        try:
            # 1. A batch completes.
            first = start()
            rows = [chat_line(f"honcho-{i}", f"hello {i}") for i in range(5)]
            f = client.files.create(file=("in.jsonl", to_jsonl(rows)), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            done = _wait_batch(client, batch.id, first.check_alive)
            assert done.status == "completed", done
            assert done.request_counts.total == 5 and done.request_counts.completed == 5, done.request_counts
            out_lines = parse_jsonl(client.files.content(done.output_file_id).text)
            assert sorted(line["custom_id"] for line in out_lines) == sorted(r["custom_id"] for r in rows)
            assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in out_lines)
            assert done.error_file_id is None

            # 2. A restart (an upgrade) while lines are in flight: some finish within the grace,
            #    some outlast it and are handed back; after the restart every line ends exactly once.
            #    Both kinds wait at the mock's gates: "quick" is released right after the SIGTERM,
            #    "stuck" only once every process has stopped.
            mock.reset()
            slow = [chat_line(f"slow-{i}", f"slow {i}", mock_hold="quick" if i % 2 else "stuck") for i in range(8)]
            f2 = client.files.create(file=("slow.jsonl", to_jsonl(slow)), purpose="batch")
            batch2 = client.batches.create(
                input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            for gate in ("quick", "stuck"):
                mock.wait_held(gate, 4)
            print(f"honcho stop with lines in flight: {first.stop(after_sigterm=lambda: mock.release('quick')):.2f}s")
            mock.release("stuck")
            stopped = first.output()
            assert '"draining"' in stopped, stopped[-4000:]
            handed_back = [
                json.loads(line.split("| ", 1)[1]) for line in stopped.splitlines() if '"left_unfinished"' in line
            ]
            assert [e["lines"] for e in handed_back] == [4], stopped[-4000:]
            restarted = time.monotonic()
            second = start()
            # The handed-back lines are idle past their lease (LEASE_S): the new worker takes them
            # at once instead of waiting for the lease to run out.
            done2 = _wait_batch(client, batch2.id, second.check_alive, timeout=LEASE_S / 10)
            assert time.monotonic() - restarted < LEASE_S / 10
            assert done2.status == "completed", done2
            assert done2.request_counts.completed == 8 and done2.request_counts.failed == 0, done2.request_counts
            ids = [line["custom_id"] for line in parse_jsonl(client.files.content(done2.output_file_id).text)]
            assert sorted(ids) == sorted(r["custom_id"] for r in slow), ids
            assert mock.stats()["requests"] >= 12  # the 4 handed-back lines were sent again
            print(f"honcho stop, idle: {second.stop():.2f}s")
        finally:
            client.close()
    finally:
        for h in runs:
            h.kill()
        runner.close()


# --------------------------------------------------------------------------------------------
# the buildpack's install


def _working_tree_files() -> list[str]:
    """Tracked files plus new ones not ignored: what the next commit (and git push) would hold."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout.decode()
    return [p for p in listed.split("\0") if p and (ROOT / p).is_file()]


# Failure deadlines only: creating a venv (ensurepip) and installing every requirement took over
# 2 minutes on a 2-core box running other suites beside this one.
@pytest.mark.timeout(900)
def test_buildpack_install(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    app = tmp_path / "app"
    for rel in _working_tree_files():
        dest = app / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    assert (app / "requirements.txt").is_file(), "no requirements.txt: the buildpack would not detect a Python app"
    version = (app / ".python-version").read_text().split()[0]
    assert version == f"{sys.version_info.major}.{sys.version_info.minor}", (
        f".python-version pins {version}; this test runs Python {sys.version_info.major}.{sys.version_info.minor}"
    )

    venv = tmp_path / "venv"
    # No pip inside (ensurepip alone costs seconds of CPU): this test's own pip installs into the
    # venv (--python), without compiling every installed module to bytecode (--no-compile). What is
    # checked is unchanged: requirements.txt resolves and installs, and the app then runs from it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # The buildpack's command, from the app root.
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-input",
            "--no-compile",
            "-r",
            "requirements.txt",
        ],
        cwd=str(app),
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert install.returncode == 0, (
        f"pip install -r requirements.txt failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}"
    )

    # Run the way the Procfile does, from the app root with the venv's bin on PATH...
    run_env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    cli = subprocess.run(
        ["sluice", "--help"], cwd=str(app), env=run_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert cli.returncode == 0, cli.stderr
    for command in ("web", "worker", "finalizer"):
        assert command in cli.stdout, cli.stdout
    imports = "import service.web, workers.worker, workers.finalizer"
    probe = subprocess.run(
        [str(python), "-c", imports], cwd=str(app), env=run_env, capture_output=True, text=True, check=False, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    # Deploys keep file contents in an object store: the install carries the s3 extra.
    s3 = subprocess.run(
        [
            str(python),
            "-c",
            "from service.core.config import Settings; "
            "Settings.from_env({'SLUICE_STORAGE_URL': 's3://sluice-deploy/files'}); import aiobotocore",
        ],
        cwd=str(app),
        env=run_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert s3.returncode == 0, f"the buildpack's install cannot use S3 storage:\n{s3.stderr}"
    # ...and from elsewhere: the package itself was installed, not only found in the app root.
    where = subprocess.run(
        [str(python), "-c", imports + "; import service; print(service.__file__)"],
        cwd=str(tmp_path),
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout, where.stdout


# --------------------------------------------------------------------------------------------
# deploy/ consistency


def _app_json() -> dict:
    return json.loads((DEPLOY / "app.json").read_text())


def _systemd_types() -> set[str]:
    units = sorted((DEPLOY / "systemd").glob("sluice-*.service"))
    return {re.sub(r"^sluice-|@?\.service$", "", u.name) for u in units}


def test_deploy_files_agree_on_process_types():
    procfile = _procfile_types()
    assert procfile, "the Procfile declares no process type"
    app = _app_json()
    assert set(app["formation"]) == set(procfile), (app["formation"], procfile)
    assert app["formation"]["finalizer"]["quantity"] == 1, "one finalizer by default (more share the batches)"
    assert _systemd_types() == set(procfile), (_systemd_types(), procfile)
    # Every unit runs the same command as the Procfile line of its type.
    commands = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    for kind, command in commands.items():
        unit = next((DEPLOY / "systemd").glob(f"sluice-{kind.strip()}*.service")).read_text()
        exec_start = re.search(r"^ExecStart=(\S+)\s+(.*)$", unit, re.MULTILINE)
        assert exec_start, f"no ExecStart in the {kind} unit"
        assert exec_start.group(1).endswith("/" + command.split()[0]), exec_start.group(0)
        assert exec_start.group(2).strip() == " ".join(command.split()[1:]), exec_start.group(0)


def _names_read_by_sluice() -> set[str]:
    names: set[str] = set()
    for pkg in ("service", "workers"):
        for path in (ROOT / pkg).rglob("*.py"):
            names.update(re.findall(r"[\"'](SLUICE_[A-Z0-9_]+|OTEL_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def _env_example_names() -> set[str]:
    names = set()
    for line in (DEPLOY / "sluice.env.example").read_text().splitlines():
        m = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if m:
            names.add(m.group(1))
    return names


def _documented_names() -> set[str]:
    return set(_app_json()["env"]) | _env_example_names()


def test_deploy_files_name_only_variables_sluice_reads():
    read = _names_read_by_sluice()
    assert {"SLUICE_API_TOKENS", "SLUICE_STORAGE_URL"} <= read  # the scan itself works
    unknown = sorted(
        n for n in _documented_names() if n not in read and n not in STANDARD_VARS and not n.startswith("AWS_")
    )
    assert not unknown, f"deploy/ names variables Sluice never reads: {unknown}"


def test_deploy_defaults_are_valid_settings():
    from honcho.environ import parse

    from service.core.config import Settings

    example = parse((DEPLOY / "sluice.env.example").read_text())
    assert not any(v.startswith((" ", "\t")) or " #" in v for v in example.values()), example
    Settings.from_env(example)
    app_values = {k: v["value"] for k, v in _app_json()["env"].items() if "value" in v}
    settings = Settings.from_env({**app_values, "SLUICE_STORAGE_URL": "s3://bucket-name/sluice"})
    assert settings.s3 is not None and settings.s3.bucket == "bucket-name"


def test_deploy_files_settings():
    app = _app_json()
    assert "heroku/python" in [b["url"] for b in app["buildpacks"]]
    assert any(a["plan"].startswith("heroku-redis") for a in app["addons"]), app["addons"]
    assert app["env"]["SLUICE_API_TOKENS"].get("required", True) is True
    assert app["env"]["SLUICE_SECRET_KEY"]["generator"] == "secret"
    grace = float(app["env"]["SLUICE_SHUTDOWN_GRACE_S"]["value"])
    assert grace < 30, "the platform sends SIGKILL 30 s after SIGTERM"
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "EnvironmentFile=/etc/sluice/sluice.env" in text, unit.name
        assert re.search(r"^KillSignal=SIGTERM$", text, re.MULTILINE), unit.name
        assert re.search(r"^Restart=always$", text, re.MULTILINE), unit.name
        assert re.search(r"^User=sluice$", text, re.MULTILINE), unit.name
        stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1))
        assert stop > 2 * 20, f"{unit.name}: TimeoutStopSec={stop} leaves no room for a 20 s grace (twice for web)"
