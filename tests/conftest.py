"""Shared fixtures and helpers for the Sluice test suite.

Integration tests start real processes (``redis-server`` and ``python -m service.cli ...``) and drive
them with the official ``openai`` SDK in strict mode. Everything here is bounded in time: waits poll a
condition with an explicit timeout, and processes get SIGTERM then SIGKILL at teardown.

Fixtures
--------
``wait_until``         the :func:`wait_until` helper (poll a predicate, raise on timeout).
``async_wait_until``   the :func:`async_wait_until` helper.
``free_port``          the :func:`free_port` helper.
``process_runner``     a :class:`ProcessRunner` whose processes die with the test.
``redis_server``       a private ``redis-server`` (:class:`RedisServer`) for one test.
``stack``              the session's default :class:`Stack` (redis, mock provider, web, 2 workers, finalizer).
``stack_factory``      a :class:`StackFactory` whose stacks die with the test.
``module_stack_factory`` the same, with stacks living for the whole test module.
``moto_server``        a session-wide S3-compatible server (moto's server mode, :class:`MotoServer`) on loopback.
``s3_bucket``          a fresh, empty bucket on it for one test (:class:`S3Bucket`); ``s3_bucket.env`` is the
                       environment that points Sluice processes at it.

Multi-host stacks: ``stack_factory.start(separate_data_dirs=True, env=s3_bucket.env)`` gives every Sluice
process (and every one :meth:`Stack.spawn` starts) its own ``SLUICE_DATA_DIR`` under the stack's data dir,
as separate hosts would have: they share only Redis and the object store.

Multi-provider stacks: ``stack_factory.start(upstream=False, extra_mocks={"p1": {"record": True}},
config_toml=...)`` starts more mock providers and writes ``config_toml`` (a :class:`string.Template`:
``${mock_url}`` is the default mock, ``${p1_url}`` the mock called ``p1``) to a file named by
``SLUICE_CONFIG``. ``upstream=False`` leaves ``SLUICE_UPSTREAM_URL`` unset. A mock with
``record=True`` also keeps every API request it got (:meth:`MockServer.requests`).

When a test fails, the tail of the logs of every process it used is attached to its report.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENS = ("tok-a", "tok-b")
UPSTREAM_API_KEY = "upstream-secret"
CHAT_URL = "/v1/chat/completions"
DEFAULT_MODEL = "gpt-4o-mini"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})

STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 60

# Runners with processes still alive; the report hook attaches their logs to failing tests.
_LIVE_RUNNERS: list["ProcessRunner"] = []


# --------------------------------------------------------------------------------------------
# Polling and ports


class WaitTimeout(AssertionError):
    """A polled condition did not become true in time."""


def _describe(predicate: Callable[..., Any], message: str | Callable[[], str] | None) -> str:
    if callable(message):
        try:
            return message()
        except Exception as exc:  # the description must never hide the timeout itself
            return f"<message callback failed: {exc!r}>"
    if message:
        return message
    return getattr(predicate, "__name__", repr(predicate))


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    check: Callable[[], None] | None = None,
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that value.

    ``ignore``: exception types raised by the predicate that count as "not yet" (any other exception
    propagates at once). ``check``: called before every attempt; it raises to abort the wait early
    (for instance when a process died). On timeout raises :class:`WaitTimeout` naming ``message``
    (a string, or a callable evaluated then) and the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            seen = f"last error {last_exc!r}" if last_exc is not None else f"last value {last!r}"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {_describe(predicate, message)} ({seen})")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    check: Callable[[], None] | None = None,
) -> Any:
    """Async twin of :func:`wait_until`; ``predicate`` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            seen = f"last error {last_exc!r}" if last_exc is not None else f"last value {last!r}"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {_describe(predicate, message)} ({seen})")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Raw HTTP (for what the SDK cannot send: no token, malformed bodies, header checks)


@dataclass
class HttpResult:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> HttpResult:
    """Send one HTTP request and return status, headers and body, whatever the status."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    if json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpResult(exc.code, exc.headers, exc.read())


def assert_error_envelope(
    result: Any,
    status: int | None = None,
    *,
    param: Any = ...,
    param_prefix: str | None = None,
    code: Any = ...,
) -> dict:
    """Check an OpenAI error response and return its ``error`` object.

    ``result`` is an :class:`HttpResult` or an ``openai.APIStatusError``. The envelope must be
    ``{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`` served as JSON.
    ``param``/``code`` (when given) must match exactly; ``param_prefix`` checks ``param`` starts with it.
    """
    import openai

    if isinstance(result, openai.APIStatusError):
        got_status = result.status_code
        content_type = result.response.headers.get("content-type", "")
        raw = result.response.content
    else:
        got_status, content_type, raw = result.status, result.content_type, result.body
    if status is not None:
        assert got_status == status, f"expected HTTP {status}, got {got_status}: {raw[:500]!r}"
    assert "json" in content_type.split(";")[0], f"error content-type {content_type!r} is not JSON: {raw[:300]!r}"
    body = json.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"no error envelope: {body!r}"
    err = body["error"]
    for key in ("message", "type", "param", "code"):
        assert key in err, f"error object lacks {key!r}: {err!r}"
    assert isinstance(err["message"], str) and err["message"], f"empty error message: {err!r}"
    assert isinstance(err["type"], str) and err["type"], f"bad error type: {err!r}"
    assert err["param"] is None or isinstance(err["param"], str), f"bad error param: {err!r}"
    assert err["code"] is None or isinstance(err["code"], str), f"bad error code: {err!r}"
    if param is not ...:
        assert err["param"] == param, f"expected param {param!r}, got {err!r}"
    if param_prefix is not None:
        assert isinstance(err["param"], str) and err["param"].startswith(param_prefix), (
            f"expected param starting with {param_prefix!r}, got {err!r}"
        )
    if code is not ...:
        assert err["code"] == code, f"expected code {code!r}, got {err!r}"
    return err


# --------------------------------------------------------------------------------------------
# Batch input lines


def chat_line(
    custom_id: str,
    content: str,
    *,
    model: str = DEFAULT_MODEL,
    url: str = CHAT_URL,
    method: str = "POST",
    **body_extra: Any,
) -> dict:
    """One chat-completions request line; ``body_extra`` goes into ``body`` (e.g. ``mock_status=404``)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], **body_extra}
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def to_jsonl(rows: Iterable[Any]) -> bytes:
    """JSONL bytes: dicts (and other JSON values) are encoded, ``str`` items are written verbatim."""
    out = []
    for row in rows:
        out.append(row if isinstance(row, str) else json.dumps(row, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def parse_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Processes


class ProcessDied(AssertionError):
    """A process we started exited while it should be running."""


class ManagedProcess:
    """A subprocess in its own process group, with stdout and stderr sent to one log file."""

    def __init__(
        self, name: str, args: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path, stop_stage: int
    ):
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.stop_stage = stop_stage
        self.stopping = False
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            self.args,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Signal the process group this process leads (its own children included)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive else f"exited with {self.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log_path})"

    def close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


class ProcessRunner:
    """Starts processes with logs under ``log_dir``; :meth:`close` stops them all.

    Stopping is by stage, highest first (Sluice processes before the redis they use): SIGTERM to the
    stage, up to ``STOP_GRACE_S`` for them to exit, then SIGKILL.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self.closed = False
        _LIVE_RUNNERS.append(self)

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        stop_stage: int = 1,
    ) -> ManagedProcess:
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
        )
        self.processes.append(proc)
        return proc

    def died(self) -> list[ManagedProcess]:
        """Processes that exited although nobody asked them to."""
        return [p for p in self.processes if not p.stopping and not p.alive]

    def check_alive(self) -> None:
        dead = self.died()
        if dead:
            raise ProcessDied(
                "process(es) exited unexpectedly: "
                + ", ".join(p.describe() for p in dead)
                + "\n"
                + self.tails(dead)
            )

    def tails(self, procs: Iterable[ManagedProcess] | None = None, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for p in self.processes if procs is None else procs:
            parts.append(f"----- {p.describe()} -----\n{p.tail(lines)}")
        return "\n".join(parts)

    def stop(self, procs: Iterable[ManagedProcess], *, grace: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> None:
        procs = list(procs)
        for p in procs:
            p.stopping = True
            if p.alive:
                p.signal(sig)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                try:
                    p.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            p.signal(signal.SIGKILL)  # stray children left in the group
            p.close_log()

    def close(self) -> list[ManagedProcess]:
        """Stop everything; return the processes that had died before we asked them to stop."""
        if self.closed:
            return []
        self.closed = True
        died = self.died()
        for stage in sorted({p.stop_stage for p in self.processes}, reverse=True):
            self.stop([p for p in self.processes if p.stop_stage == stage])
        if self in _LIVE_RUNNERS:
            _LIVE_RUNNERS.remove(self)
        return died


def _fail_if_died(died: list[ManagedProcess], runner: ProcessRunner) -> None:
    if died:
        pytest.fail(
            "process(es) exited before teardown: "
            + ", ".join(p.describe() for p in died)
            + "\n"
            + runner.tails(died),
            pytrace=False,
        )


# --------------------------------------------------------------------------------------------
# Redis


@dataclass
class RedisServer:
    port: int
    url: str
    process: ManagedProcess
    runner: ProcessRunner

    def client(self, **kwargs: Any):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, **kwargs)

    def find(self, needle: str | bytes) -> list[str]:
        """Where ``needle`` occurs in this Redis: key names, and every value of every key (any type).

        Returns descriptions such as ``"key 'x' (hash field 'f')"``; empty when it occurs nowhere.
        """
        import redis

        needle_b = needle.encode() if isinstance(needle, str) else needle
        found: list[str] = []
        client = self.client()
        try:
            for key in client.scan_iter(count=1000):
                name = key.decode(errors="replace")
                if needle_b in key:
                    found.append(f"key name {name!r}")
                try:
                    kind = client.type(key).decode()
                    parts: list[tuple[str, bytes]] = []
                    if kind == "string":
                        parts = [("value", client.get(key) or b"")]
                    elif kind == "hash":
                        for f, v in client.hgetall(key).items():
                            parts += [(f"hash field name {f!r}", f), (f"hash field {f!r}", v)]
                    elif kind == "set":
                        parts = [("set member", m) for m in client.smembers(key)]
                    elif kind == "zset":
                        parts = [("zset member", m) for m in client.zrange(key, 0, -1)]
                    elif kind == "list":
                        parts = [("list item", m) for m in client.lrange(key, 0, -1)]
                    elif kind == "stream":
                        for entry_id, fields in client.xrange(key):
                            for f, v in fields.items():
                                parts += [(f"stream entry {entry_id!r} field {f!r}", f + b"=" + v)]
                except redis.ResponseError:
                    continue  # the key changed type or vanished between SCAN and the read
                for where, value in parts:
                    if needle_b in value:
                        found.append(f"key {name!r} ({where})")
        finally:
            client.close()
        return found

    def restart(self, *, sig: int = signal.SIGKILL) -> None:
        """Stop redis-server with ``sig`` and start it again on the same port and data dir."""
        old = self.process
        old.stopping = True
        old.signal(sig)
        old.popen.wait(timeout=15)
        old.close_log()
        self.process = self.runner.start("redis", old.args, stop_stage=0)
        _wait_for_ping(self.port, self.process)


def _wait_for_ping(port: int, proc: ManagedProcess) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        # BusyLoadingError (an AOF being replayed) is a ConnectionError: keep waiting through it.
        wait_until(
            client.ping,
            timeout=20,
            message=f"redis-server on port {port} to answer PING",
            ignore=(redis.ConnectionError, redis.TimeoutError, OSError),
            check=lambda: _raise_if_exited(proc),
        )
    finally:
        client.close()


def start_redis(runner: ProcessRunner, workdir: Path, *, attempts: int = 3, appendonly: bool = False) -> RedisServer:
    """Start a private ``redis-server`` on a free port (never the shared 6379) and wait for PING.

    ``appendonly`` turns AOF persistence on, as a managed Redis has it, so a restart keeps data.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: BaseException | None = None
    for _ in range(attempts):
        port = free_port()
        proc = runner.start(
            "redis",
            [exe, "--port", str(port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir)],
            stop_stage=0,
        )
        try:
            _wait_for_ping(port, proc)
            return RedisServer(port, f"redis://127.0.0.1:{port}/0", proc, runner)
        except ProcessDied as exc:  # most likely the port was taken in the meantime: retry
            last_error = exc
            proc.stopping = True
    raise AssertionError(f"could not start redis-server: {last_error}")


def _raise_if_exited(proc: ManagedProcess) -> None:
    if not proc.alive and not proc.stopping:
        raise ProcessDied(f"{proc.describe()}\n{proc.tail()}")


# --------------------------------------------------------------------------------------------
# Mock providers

RECORDING_MOCK = Path(__file__).resolve().parent / "recording_mock.py"


@dataclass(frozen=True)
class MockSpec:
    """Options of one mock provider process (``None``: the mock's default).

    ``max_concurrency``, ``rpm`` and ``window_s`` make the mock answer 429 beyond those limits;
    ``batch_*`` pace its Batch API (see service/devtools/mock_provider.py);
    ``record`` runs it through ``tests/recording_mock.py``, which also keeps every API request.
    """

    latency_ms: float | None = None
    error_rate: float | None = None
    max_concurrency: int | None = None
    rpm: int | None = None
    window_s: float | None = None
    batch_line_ms: float | None = None
    batch_start_ms: float | None = None
    batch_cancel_ms: float | None = None
    batch_window_ms: float | None = None
    retry_after: bool = True  # False: no 429 carries a Retry-After header
    record: bool = False

    def command(self, port: int) -> list[str]:
        if self.record:
            args = [sys.executable, str(RECORDING_MOCK), "--port", str(port)]
        else:
            args = _sluice_cmd("mock-provider", "--port", str(port))
        for flag, value in (
            ("--latency-ms", self.latency_ms),
            ("--error-rate", self.error_rate),
            ("--max-concurrency", self.max_concurrency),
            ("--rpm", self.rpm),
            ("--window-s", self.window_s),
            ("--batch-line-ms", self.batch_line_ms),
            ("--batch-start-ms", self.batch_start_ms),
            ("--batch-cancel-ms", self.batch_cancel_ms),
            ("--batch-window-ms", self.batch_window_ms),
        ):
            if value is not None:
                args += [flag, str(value)]
        if not self.retry_after:
            args.append("--no-retry-after")
        return args


@dataclass
class MockServer:
    """A running mock provider: its URL, counters and (for a recording one) its requests."""

    name: str
    port: int
    process: ManagedProcess
    record: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        res = http_request("GET", f"{self.url}/_mock/stats", timeout=10)
        assert res.status == 200, f"mock {self.name} stats answered {res.status}: {res.body[:300]!r}"
        return res.json()

    def reset(self) -> None:
        res = http_request("POST", f"{self.url}/_mock/reset", timeout=10)
        assert res.status in (200, 204), f"mock {self.name} reset answered {res.status}: {res.body[:300]!r}"

    def requests(self) -> list[dict]:
        """Every API request since the last reset, oldest first (recording mocks only).

        Each is ``{"at", "method", "path", "authorization", "model", "content", "status"}``; ``content`` is the
        last chat message's content (or ``prompt`` / ``input``), ``at`` the ``time.time()`` of arrival.
        """
        assert self.record, f"mock {self.name} does not record requests (start it with MockSpec(record=True))"
        res = http_request("GET", f"{self.url}/_mock/requests", timeout=10)
        assert res.status == 200, f"mock {self.name} requests answered {res.status}: {res.body[:300]!r}"
        return res.json()

    def wait_ready(self, runner: "ProcessRunner") -> None:
        wait_until(
            lambda: http_request("GET", f"{self.url}/_mock/stats", timeout=2).status == 200,
            timeout=STARTUP_TIMEOUT_S,
            interval=0.1,
            message=f"mock provider {self.name} on port {self.port} to answer GET /_mock/stats",
            ignore=(OSError,),
            check=runner.check_alive,
        )


def _mock_spec(spec: MockSpec | Mapping[str, Any]) -> MockSpec:
    """A :class:`MockSpec` from itself or from its options as a dict (test modules need no import)."""
    return MockSpec(**spec) if isinstance(spec, Mapping) else spec


def start_mock(runner: "ProcessRunner", name: str, spec: MockSpec, *, env: Mapping[str, str]) -> MockServer:
    """Start a mock provider on a free port (not waiting for it: see :meth:`MockServer.wait_ready`)."""
    port = free_port()
    proc_name = "mock-provider" if name == "default" else f"mock-{name}"
    proc = runner.start(proc_name, spec.command(port), env={**env, "SLUICE_LOG_LEVEL": "info"})
    return MockServer(name=name, port=port, process=proc, record=spec.record)


# --------------------------------------------------------------------------------------------
# An S3-compatible object store (moto's server mode)

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class MotoServer:
    """``python -m moto.server`` on a free loopback port; it keeps everything in memory."""

    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """A boto3 S3 client for it (synchronous: for set-up and checks)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def start_moto(runner: ProcessRunner, *, attempts: int = 3) -> MotoServer:
    """Start moto's server on a free port of 127.0.0.1 and wait until it answers."""
    last_error: BaseException | None = None
    for _ in range(attempts):
        port = free_port()
        proc = runner.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**_base_env(), **S3_CREDENTIALS}, stop_stage=0)
        server = MotoServer(port, proc)
        try:
            wait_until(lambda: http_request("GET", f"{server.url}/moto-api/", timeout=2).status < 500,
                       timeout=STARTUP_TIMEOUT_S, interval=0.1, message=f"moto server on port {port} to answer",
                       ignore=(OSError,), check=lambda: _raise_if_exited(proc))
            return server
        except ProcessDied as exc:  # most likely the port was taken in the meantime: retry
            last_error = exc
            proc.stopping = True
    raise AssertionError(f"could not start moto server: {last_error}")


@dataclass
class S3Bucket:
    """One bucket on a :class:`MotoServer`, with the prefix Sluice stores under."""

    server: MotoServer
    name: str
    prefix: str = "sluice"

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes a Sluice process store file contents here."""
        return {**S3_CREDENTIALS, "SLUICE_STORAGE_URL": f"s3://{self.name}/{self.prefix}",
                "SLUICE_S3_ENDPOINT_URL": self.server.url}

    def keys(self) -> list[str]:
        """Every object name in the bucket."""
        client = self.server.client()
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            found += [obj["Key"] for obj in page.get("Contents", ())]
        return found


# --------------------------------------------------------------------------------------------
# A Sluice stack


_DEFAULT = object()


@dataclass
class Stack:
    """Redis + mock provider + web + workers + finalizer, all real processes.

    ``base_url`` is the web root (bare paths), ``api_url`` the same with ``/v1``.
    """

    name: str
    runner: ProcessRunner
    redis: RedisServer
    port: int
    mock_port: int
    data_dir: Path
    env: dict[str, str]
    tokens: tuple[str, ...] = TOKENS
    mocks: dict[str, MockServer] = field(default_factory=dict)
    config_path: Path | None = None
    separate_data_dirs: bool = False
    _clients: list[Any] = field(default_factory=list, repr=False)

    # Pure helpers, reachable from tests through the fixture.
    chat_line = staticmethod(chat_line)
    to_jsonl = staticmethod(to_jsonl)
    parse_jsonl = staticmethod(parse_jsonl)
    assert_error = staticmethod(assert_error_envelope)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def mock_url(self) -> str:
        return f"http://127.0.0.1:{self.mock_port}"

    @property
    def token(self) -> str:
        return self.tokens[0]

    @property
    def processes(self) -> list[ManagedProcess]:
        return self.runner.processes

    def process(self, name: str) -> ManagedProcess:
        for p in self.runner.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_alive(self) -> None:
        self.runner.check_alive()

    def spawn(self, role: str, name: str | None = None) -> ManagedProcess:
        """Start one more Sluice process (``web``, ``worker`` or ``finalizer``) with this stack's env.

        A new ``web`` reuses the stack's port, so start it only after the old one has exited.
        """
        env = dict(self.env)
        if role == "web":
            env["PORT"] = str(self.port)
        if self.separate_data_dirs:
            env["SLUICE_DATA_DIR"] = str(_own_data_dir(self.data_dir, f"{name or role}-{len(self.processes) + 1}"))
        return self.runner.start(name or role, _sluice_cmd(role), env=env)

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        wait_until(
            lambda: http_request("GET", f"{self.base_url}/healthz", timeout=2).status == 200,
            timeout=timeout,
            interval=0.1,
            message=f"web on port {self.port} to answer GET /healthz with 200",
            ignore=(OSError,),
            check=self.check_alive,
        )

    # ---- SDK

    def client(self, token: str | None = None, *, bare: bool = False, **kwargs: Any):
        """A strict, non-retrying ``openai.OpenAI`` client (``bare``: base URL without ``/v1``)."""
        import openai

        options: dict[str, Any] = dict(
            base_url=self.base_url if bare else self.api_url,
            api_key=token or self.token,
            _strict_response_validation=True,
            max_retries=0,
            timeout=30.0,
        )
        options.update(kwargs)
        client = openai.OpenAI(**options)
        self._clients.append(client)
        return client

    def upload_jsonl(
        self,
        rows: Iterable[Any] | bytes,
        *,
        client: Any = None,
        filename: str = "batch_input.jsonl",
        purpose: str = "batch",
    ):
        """Upload ``rows`` (dicts/strings, see :func:`to_jsonl`, or raw bytes); return the FileObject."""
        client = client or self.client()
        data = rows if isinstance(rows, bytes) else to_jsonl(rows)
        return client.files.create(file=(filename, data), purpose=purpose)

    def create_batch(self, input_file_id: str, *, client: Any = None, endpoint: str = CHAT_URL, **kwargs: Any):
        client = client or self.client()
        return client.batches.create(input_file_id=input_file_id, endpoint=endpoint, completion_window="24h", **kwargs)

    def submit(self, rows: Iterable[Any] | bytes, *, client: Any = None, **kwargs: Any):
        """Upload ``rows`` and create a batch from them; return ``(file, batch)``."""
        client = client or self.client()
        f = self.upload_jsonl(rows, client=client)
        return f, self.create_batch(f.id, client=client, **kwargs)

    def wait_for_batch(
        self,
        batch_id: str,
        *,
        client: Any = None,
        timeout: float = 60.0,
        statuses: Iterable[str] = TERMINAL_STATUSES,
        interval: float = 0.1,
    ):
        """Poll ``batches.retrieve`` until the status is in ``statuses``; return the Batch."""
        client = client or self.client()
        wanted = frozenset(statuses)
        last: list[Any] = [None]

        def reached():
            last[0] = client.batches.retrieve(batch_id)
            return last[0] if last[0].status in wanted else None

        return wait_until(
            reached,
            timeout=timeout,
            interval=interval,
            message=lambda: f"batch {batch_id} to reach {sorted(wanted)}; last state {_batch_summary(last[0])}",
            check=self.check_alive,
        )

    def read_file(self, file_id: str, *, client: Any = None) -> list[dict]:
        client = client or self.client()
        return parse_jsonl(client.files.content(file_id).text)

    def results(self, batch: Any, *, client: Any = None) -> tuple[list[dict], list[dict]]:
        """``(output lines, error lines)`` of a finished batch (empty list when the file id is null)."""
        client = client or self.client()
        out = self.read_file(batch.output_file_id, client=client) if batch.output_file_id else []
        err = self.read_file(batch.error_file_id, client=client) if batch.error_file_id else []
        return out, err

    # ---- raw HTTP

    def http(
        self,
        method: str,
        path: str,
        *,
        token: Any = _DEFAULT,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 15.0,
    ) -> HttpResult:
        """Raw request to the web process; ``token=None`` sends no Authorization header."""
        if token is _DEFAULT:
            token = self.token
        return http_request(
            method, self.base_url + path, token=token, json_body=json_body, data=data, headers=headers, timeout=timeout
        )

    # ---- mock provider

    def mock_stats(self) -> dict:
        return self.mock().stats()

    def mock_reset(self) -> None:
        self.mock().reset()

    def mock(self, name: str = "default") -> MockServer:
        """The mock provider called ``name`` (``default`` is the one at :attr:`mock_url`)."""
        return self.mocks[name]

    def reset_mocks(self) -> None:
        for m in self.mocks.values():
            m.reset()

    # ---- the sluice command and logs

    def sluice(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``python -m service.cli ARGS`` with this stack's environment; capture text output."""
        proc = subprocess.run(
            _sluice_cmd(*args),
            env={**self.env, **(env or {})},
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert proc.returncode == 0, (
                f"sluice {' '.join(args)} exited with {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def logs_containing(self, needle: str) -> list[str]:
        """Names of this stack's processes whose log contains ``needle``."""
        found = []
        for proc in self.processes:
            try:
                text = proc.log_path.read_bytes().decode(errors="replace")
            except OSError:
                continue
            if needle in text:
                found.append(proc.name)
        return found

    def close(self) -> list[ManagedProcess]:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        return self.runner.close()


def _batch_summary(batch: Any) -> str:
    if batch is None:
        return "none"
    return (
        f"status={batch.status} counts={batch.request_counts} errors={batch.errors} "
        f"output={batch.output_file_id} error_file={batch.error_file_id}"
    )


def _own_data_dir(parent: Path, name: str) -> Path:
    """A data dir of one process only (as on a host of its own)."""
    path = parent / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sluice_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLUICE_", "OPENAI_")) and k not in ("REDIS_URL", "PORT")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class StackFactory:
    """Starts :class:`Stack` s under ``base_dir``; :meth:`close` stops all of them."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.stacks: list[Stack] = []

    def start(
        self,
        *,
        name: str | None = None,
        workers: int = 2,
        worker_concurrency: int = 32,
        mock_latency_ms: int | None = None,
        mock_error_rate: float | None = None,
        max_batch_lines: int | None = None,
        tokens: tuple[str, ...] = TOKENS,
        finalizer: bool = True,
        upstream_suffix: str = "",
        redis_aof: bool = False,
        env: Mapping[str, str] | None = None,
        mock: MockSpec | Mapping[str, Any] | None = None,
        extra_mocks: Mapping[str, MockSpec | Mapping[str, Any]] | None = None,
        upstream: bool = True,
        config_toml: str | None = None,
        separate_data_dirs: bool = False,
        redis_via: Callable[[RedisServer], str] | None = None,
    ) -> Stack:
        """Start a stack; ``env`` overrides the Sluice processes' environment last.

        ``upstream_suffix`` is appended to the mock's URL in ``SLUICE_UPSTREAM_URL`` (e.g. ``/v1``).
        ``mock`` sets every option of the default mock (instead of ``mock_latency_ms`` and
        ``mock_error_rate``); ``extra_mocks`` starts more mock providers, by name (see
        :attr:`Stack.mocks`). ``upstream=False`` leaves ``SLUICE_UPSTREAM_URL`` and
        ``SLUICE_UPSTREAM_API_KEY`` unset. ``config_toml`` is written to ``<stack>/sluice.toml``
        and named by ``SLUICE_CONFIG``, after substituting ``${mock_url}`` (the default mock) and
        ``${NAME_url}`` (the extra mock ``NAME``); provider keys go in through ``env``.
        ``separate_data_dirs`` gives each Sluice process its own ``SLUICE_DATA_DIR`` (``<data>/<process>``),
        so that they share only Redis and whatever ``env`` names (an object store, say).
        ``redis_via`` is given the stack's :class:`RedisServer` once it runs and returns the URL the Sluice
        processes use instead of the server's own (a proxy in front of it, say); :attr:`Stack.redis`
        still talks to the server directly.
        """
        if mock is None:
            mock = MockSpec(latency_ms=mock_latency_ms, error_rate=mock_error_rate)
        elif mock_latency_ms is not None or mock_error_rate is not None:
            raise ValueError("give the default mock's options either as mock=MockSpec(...) or as mock_*, not both")
        mock = _mock_spec(mock)
        extra_mocks = {n: _mock_spec(spec) for n, spec in (extra_mocks or {}).items()}
        for mock_name in extra_mocks:
            if mock_name == "default" or not mock_name.isidentifier():
                raise ValueError(f"bad extra mock name {mock_name!r}: an identifier other than 'default'")
        name = name or f"stack{len(self.stacks) + 1}"
        root = self.base_dir / name
        runner = ProcessRunner(root / "logs")
        try:
            redis_server = start_redis(runner, root / "redis", appendonly=redis_aof)
            data_dir = root / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            base_env = _base_env()

            mocks = {"default": start_mock(runner, "default", mock, env=base_env)}
            for mock_name, spec in extra_mocks.items():
                mocks[mock_name] = start_mock(runner, mock_name, spec, env=base_env)
            mock_port = mocks["default"].port

            sluice_env = {
                **base_env,
                "REDIS_URL": redis_via(redis_server) if redis_via is not None else redis_server.url,
                "SLUICE_DATA_DIR": str(data_dir),
                "SLUICE_API_TOKENS": ",".join(tokens),
                "SLUICE_WORKER_CONCURRENCY": str(worker_concurrency),
                "SLUICE_LOG_LEVEL": "info",
                "SLUICE_SHUTDOWN_GRACE_S": "2",
            }
            if upstream:
                sluice_env["SLUICE_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_port}{upstream_suffix}"
                sluice_env["SLUICE_UPSTREAM_API_KEY"] = UPSTREAM_API_KEY
            config_path = None
            if config_toml is not None:
                urls = {"mock_url": mocks["default"].url, **{f"{n}_url": m.url for n, m in mocks.items()}}
                config_path = root / "sluice.toml"
                config_path.write_text(string.Template(config_toml).substitute(urls))
                sluice_env["SLUICE_CONFIG"] = str(config_path)
            if max_batch_lines is not None:
                sluice_env["SLUICE_MAX_BATCH_LINES"] = str(max_batch_lines)
            sluice_env.update(env or {})

            def own(proc_name: str) -> dict[str, str]:
                if not separate_data_dirs:
                    return sluice_env
                return {**sluice_env, "SLUICE_DATA_DIR": str(_own_data_dir(data_dir, proc_name))}

            web_port = free_port()
            runner.start("web", _sluice_cmd("web"), env={**own("web"), "PORT": str(web_port)})
            for i in range(workers):
                runner.start(f"worker-{i + 1}", _sluice_cmd("worker"), env=own(f"worker-{i + 1}"))
            if finalizer:
                runner.start("finalizer", _sluice_cmd("finalizer"), env=own("finalizer"))

            stack = Stack(
                name=name,
                runner=runner,
                redis=redis_server,
                port=web_port,
                mock_port=mock_port,
                data_dir=data_dir,
                env=sluice_env,
                tokens=tokens,
                mocks=mocks,
                config_path=config_path,
                separate_data_dirs=separate_data_dirs,
            )
            for m in mocks.values():
                m.wait_ready(runner)
            stack.wait_healthy()
            stack.reset_mocks()
            runner.check_alive()
        except (WaitTimeout, ProcessDied, AssertionError, OSError) as exc:
            tails = runner.tails()
            runner.close()
            raise AssertionError(f"stack {name!r} did not start: {exc}\n{tails}") from exc
        except BaseException:
            runner.close()
            raise
        self.stacks.append(stack)
        return stack

    def close(self) -> None:
        problems = []
        for stack in reversed(self.stacks):
            died = stack.close()
            if died:
                problems.append((died, stack.runner))
        self.stacks.clear()
        for died, runner in problems:
            _fail_if_died(died, runner)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


@pytest.fixture(name="async_wait_until")
def async_wait_until_fixture():
    return async_wait_until


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


@pytest.fixture
def process_runner(tmp_path):
    runner = ProcessRunner(tmp_path / "logs")
    yield runner
    _fail_if_died(runner.close(), runner)


@pytest.fixture
def redis_server(tmp_path):
    runner = ProcessRunner(tmp_path / "redis-logs")
    try:
        server = start_redis(runner, tmp_path / "redis")
        yield server
    finally:
        died = runner.close()
    _fail_if_died(died, runner)


@pytest.fixture
def stack_factory(tmp_path):
    factory = StackFactory(tmp_path / "stacks")
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_stack_factory(tmp_path_factory, request):
    factory = StackFactory(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    runner = ProcessRunner(tmp_path_factory.mktemp("moto") / "logs")
    try:
        yield start_moto(runner)
    finally:
        died = runner.close()
    _fail_if_died(died, runner)


_buckets = iter(range(1, 1_000_000))


@pytest.fixture
def s3_bucket(moto_server):
    """A new empty bucket on the session's moto server (moto keeps it in memory until the session ends)."""
    bucket = S3Bucket(moto_server, f"sluice-test-{os.getpid()}-{next(_buckets)}")
    moto_server.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The default stack, shared by the whole session: 2 workers, concurrency 32, no mock latency."""
    factory = StackFactory(tmp_path_factory.mktemp("default-stack"))
    yield factory.start(name="default")
    factory.close()


# --------------------------------------------------------------------------------------------
# Attach process logs to failing tests


def _runners_of(item: pytest.Item) -> list[ProcessRunner]:
    found: list[ProcessRunner] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ProcessRunner):
            found.append(value)
        elif isinstance(value, Stack):
            found.append(value.runner)
        elif isinstance(value, StackFactory):
            found.extend(s.runner for s in value.stacks)
        elif isinstance(value, RedisServer):
            found.extend(r for r in _LIVE_RUNNERS if value.process in r.processes)
    return [r for r in dict.fromkeys(found) if not r.closed]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for runner in _runners_of(item):
            for proc in runner.processes:
                report.sections.append((f"log tail: {proc.describe()}", proc.tail()))
