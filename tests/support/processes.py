"""Child processes that cannot outlive the test (or benchmark) that started them.

Every process started here:

- runs in a session (and process group) of its own, so stopping it signals the whole group,
  whatever it started itself;
- carries the run marker (:data:`RUN_MARKER_VAR`) in its environment, which every descendant
  inherits, so :func:`leftover_processes` finds anything the run left behind by scanning /proc,
  even processes that escaped into sessions of their own;
- gets SIGKILL from the kernel if the process that started it dies (``PR_SET_PDEATHSIG``), so a
  harness killed outright (SIGKILL, ``os._exit`` of a thread-method timeout) takes its children
  with it.

:class:`ProcessRunner` stops its processes stage by stage (highest first), SIGTERM then SIGKILL,
and never lets an exception (a pytest-timeout landing mid-teardown, say) leave one running.
Nothing here imports pytest at module level: ``bench/`` uses it too.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, NoReturn

ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 60

# The run marker: a ':'-separated list of run ids. A nested run (the benchmark under the smoke
# test) appends its own id, so each level finds its own leftovers and the outer one finds all.
# Not a SLUICE_ name: the stacks strip SLUICE_* variables from the environment they pass on.
RUN_MARKER_VAR = "SUPPORT_RUN_MARKER"

# Runners with processes still alive: the report hook attaches their logs to failing tests,
# and the exit handler stops them.
LIVE_RUNNERS: list["ProcessRunner"] = []


class ProcessDied(AssertionError):
    """A process we started exited while it should be running."""


class ToolMissing(RuntimeError):
    """An executable a helper needs (``redis-server``, say) is not installed."""


# --------------------------------------------------------------------------------------------
# The run marker and the leak scan


def begin_run() -> str:
    """Start a run: give it a fresh id, add it to this process's marker, and return the id.

    Call it once, before starting any process (pytest's configure hook, the benchmark's main).
    """
    run_id = f"{os.getpid()}.{secrets.token_hex(4)}"
    inherited = os.environ.get(RUN_MARKER_VAR, "")
    os.environ[RUN_MARKER_VAR] = f"{inherited}:{run_id}" if inherited else run_id
    return run_id


def marker_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` carrying this process's run marker.

    A marker in ``env`` that extends ours (``ours:more``, to tell one child's descendants apart) is
    kept; any other value is replaced by ours.
    """
    out = dict(env)
    marker = os.environ.get(RUN_MARKER_VAR)
    given = out.get(RUN_MARKER_VAR, "")
    if marker and not given.startswith(marker + ":"):
        out[RUN_MARKER_VAR] = marker
    elif not marker:
        out.pop(RUN_MARKER_VAR, None)
    return out


def _environ_marker(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return None
    prefix = RUN_MARKER_VAR.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace").split(":")
    return None


def _describe_pid(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid}: {cmd[:200]}"


def proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, ...) of
    every process we can see, read from /proc rather than by name."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        stats[int(entry)] = stat[stat.rindex(")") + 2 :].split()
    return stats


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (an xdist controller's workers, say)."""
    return {child for child, fields in proc_stats().items() if int(fields[1]) == pid}


def leftover_processes(run_id: str, *, spare: Iterable[int] = ()) -> dict[int, str]:
    """Live processes (not this one, nor ``spare``) whose environment carries ``run_id``: pid -> command line."""
    found = {}
    skip = {os.getpid(), *spare}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        marker = _environ_marker(pid)  # a zombie's environ is empty: it never matches
        if marker and run_id in marker:
            found[pid] = _describe_pid(pid)
    return found


def kill_leftovers(
    run_id: str, *, grace: float = 5.0, timeout: float = 10.0, spare: Iterable[int] = ()
) -> dict[int, str]:
    """SIGKILL every process :func:`leftover_processes` finds (until none is left, or ``timeout``).

    Processes already on their way out (stopped by their owner a moment ago: a browser's helpers,
    say) get ``grace`` seconds to go by themselves first. Returns the ones that were still alive
    then and had to be killed (empty when the run left nothing behind). ``spare`` is never touched.
    """
    spare = set(spare)
    first = leftover_processes(run_id, spare=spare)
    deadline = time.monotonic() + grace
    while first and time.monotonic() < deadline:
        _reap_children()
        time.sleep(0.1)
        first = {pid: desc for pid, desc in leftover_processes(run_id, spare=spare).items() if pid in first}
    deadline = time.monotonic() + timeout
    left = first
    while left and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap_children()
        time.sleep(0.05)
        left = leftover_processes(run_id, spare=spare)
    return first


def _reap_children() -> None:
    """Collect exited children of ours that no Popen waits for (they would stay zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --------------------------------------------------------------------------------------------
# Starting processes

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the marker scan still catches leftovers
    _prctl = None


def _die_with_parent(parent: int) -> None:
    # Runs in the child between fork and exec; the setting survives exec.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # A parent killed between the fork and the prctl sends no signal: the child is already
        # an orphan then, so it ends itself.
        if os.getppid() != parent:
            os._exit(1)


def popen(args: list[str], *, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, with the run marker, dying with its parent.

    The parent-death signal fires when the starting *thread* exits, so it is only asked for from
    the main thread (where tests and the benchmark start their processes).
    """
    parent = os.getpid()
    main = threading.current_thread() is threading.main_thread()
    preexec = (lambda: _die_with_parent(parent)) if main else None
    return subprocess.Popen(
        args,
        env=marker_env(os.environ if env is None else env),
        start_new_session=True,
        preexec_fn=preexec,
        **kwargs,
    )


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group ``pid`` leads (nothing happens when it is gone)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(
    args: list[str], *, timeout: float, env: Mapping[str, str] | None = None, cwd: Path = ROOT, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run a command to completion (text output captured); on timeout kill its whole group, then raise.

    ``subprocess.run`` would kill only the direct child and leave its children running.
    """
    proc = popen(
        list(args),
        env=env,
        cwd=str(cwd),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    finally:
        kill_group(proc.pid)  # on a timeout, the command; in any case, what it left in its group
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class ManagedProcess:
    """A subprocess in its own process group, with stdout and stderr sent to one log file.

    ``stdout_path`` sends stdout to a file of its own (stderr stays in the log); ``oneshot``
    marks a process that ends by itself, whose exit is not a death.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        stop_stage: int,
        stdout_path: Path | None = None,
        oneshot: bool = False,
    ):
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.stop_stage = stop_stage
        self.oneshot = oneshot
        self.stopping = False
        self._log = open(log_path, "wb")
        self._stdout = open(stdout_path, "wb") if stdout_path is not None else None
        try:
            self.popen = popen(
                self.args,
                env=env,
                cwd=str(cwd),
                stdin=subprocess.DEVNULL,
                stdout=self._stdout or self._log,
                stderr=self._log if self._stdout else subprocess.STDOUT,
            )
        except BaseException:
            self.close_log()
            raise
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Signal the process group this process leads (its own children included)."""
        kill_group(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the exit; the return code, or None if still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive else f"exited with {self.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log_path})"

    def close_log(self) -> None:
        for f in (self._log, self._stdout):
            if f is not None and not f.closed:
                f.close()


class ProcessRunner:
    """Starts processes with logs under ``log_dir``; :meth:`close` stops them all.

    Stopping is by stage, highest first (Sluice processes before the redis they use): SIGTERM to the
    stage, up to ``grace`` seconds for them to exit, then SIGKILL to the process group. Also a
    context manager that closes on exit.
    """

    def __init__(self, log_dir: Path, *, grace: float = STOP_GRACE_S):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        self.processes: list[ManagedProcess] = []
        self.closed = False
        LIVE_RUNNERS.append(self)

    def __enter__(self) -> "ProcessRunner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        stop_stage: int = 1,
        stdout_path: Path | None = None,
        oneshot: bool = False,
    ) -> ManagedProcess:
        """Start ``args`` as ``name`` (made unique with a suffix); ``env`` defaults to ours."""
        if self.closed:
            raise RuntimeError("this ProcessRunner is closed")
        taken = {p.name for p in self.processes}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        proc = ManagedProcess(
            unique,
            args,
            env=os.environ if env is None else env,
            cwd=cwd,
            log_path=self.log_dir / f"{unique}.log",
            stop_stage=stop_stage,
            stdout_path=stdout_path,
            oneshot=oneshot,
        )
        self.processes.append(proc)
        return proc

    def died(self) -> list[ManagedProcess]:
        """Processes that exited although nobody asked them to."""
        return [p for p in self.processes if not p.stopping and not p.oneshot and not p.alive]

    def check_alive(self) -> None:
        dead = self.died()
        if dead:
            hint = ""
            if any(p.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) for p in dead):
                # Sluice processes exit 0 on SIGTERM: a clean exit mid-run means someone signalled them.
                hint = " (a clean exit or a signal: were they stopped from outside, e.g. by pkill?)"
            raise ProcessDied(
                "process(es) exited unexpectedly: "
                + ", ".join(p.describe() for p in dead)
                + hint
                + "\n"
                + self.tails(dead)
            )

    def tails(self, procs: Iterable[ManagedProcess] | None = None, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for p in self.processes if procs is None else procs:
            parts.append(f"----- {p.describe()} -----\n{p.tail(lines)}")
        return "\n".join(parts)

    def stop(self, procs: Iterable[ManagedProcess], *, grace: float | None = None, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to ``procs``, wait up to ``grace`` seconds, SIGKILL the groups of the rest."""
        procs = list(procs)
        try:
            for p in procs:
                p.stopping = True
                if p.alive:
                    p.signal(sig)
            deadline = time.monotonic() + (self.grace if grace is None else grace)
            for p in procs:
                if p.wait(max(0.0, deadline - time.monotonic())) is None:
                    p.signal(signal.SIGKILL)
                    p.wait(5)
        finally:
            # Also when an exception (a test timeout) interrupted the graceful part: nothing stays up.
            for p in procs:
                p.signal(signal.SIGKILL)  # the process, if still there, and strays left in its group
                p.close_log()

    def close(self) -> list[ManagedProcess]:
        """Stop everything; return the processes that had died before we asked them to stop."""
        if self.closed:
            return []
        self.closed = True
        died = self.died()
        try:
            for stage in sorted({p.stop_stage for p in self.processes}, reverse=True):
                self.stop([p for p in self.processes if p.stop_stage == stage])
        finally:
            for p in self.processes:
                p.stopping = True
                p.signal(signal.SIGKILL)
                p.close_log()
            if self in LIVE_RUNNERS:
                LIVE_RUNNERS.remove(self)
        return died


def close_all_runners() -> None:
    """Stop every runner still open (the last line of defence at exit)."""
    for runner in list(LIVE_RUNNERS):
        try:
            runner.close()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop {runner.log_dir}: {exc!r}", file=sys.stderr)


atexit.register(close_all_runners)


def end_run(run_id: str) -> dict[int, str]:
    """Stop every runner, then kill and report (on stderr) any process of ``run_id`` still alive;
    return those. The last step of a benchmark script, failed or not."""
    close_all_runners()
    leaked = kill_leftovers(run_id)
    if leaked:
        print("processes left running (now killed):\n" + "\n".join(leaked.values()), file=sys.stderr)
    return leaked


def fail_if_died(died: list[ManagedProcess], runner: ProcessRunner) -> None:
    """Fail the current test when ``died`` is not empty (for fixtures, after ``runner.close()``)."""
    if died:
        import pytest

        pytest.fail(
            "process(es) exited before teardown: " + ", ".join(p.describe() for p in died) + "\n" + runner.tails(died),
            pytrace=False,
        )


def raise_if_exited(proc: ManagedProcess) -> None:
    """Raise :class:`ProcessDied` (with its log tail) when ``proc`` exited unasked."""
    if not proc.alive and not proc.stopping:
        raise ProcessDied(f"{proc.describe()}\n{proc.tail()}")


def skip_or_raise(reason: str) -> NoReturn:
    """Skip the current test under pytest; elsewhere (the benchmark) raise :class:`ToolMissing`."""
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    raise ToolMissing(reason)
