"""``sluice up``: the whole stack on one machine with nothing configured.

Starts a Redis of its own (a ``redis-server`` child on a free port, data under
``$SLUICE_DATA_DIR/redis``; fakeredis's TCP server in-process where no binary exists) unless
``REDIS_URL`` is set, the mock provider unless a provider is configured, then the web front end,
one worker and the finalizer as child processes. It writes the stack's connection details to
``$SLUICE_DATA_DIR/stack.json`` (service/cli/localstack.py) for the other commands.

Every child runs in its own session, so a Ctrl-C at the terminal reaches ``sluice up`` alone,
which then stops the children one role at a time: the web stops taking requests, the worker
drains into Redis, the finalizer finishes its pass, the mock provider, and Redis last. A second
Ctrl-C kills whatever still runs.

The mock serves twice: as provider ``default`` (every model; each line is one real-time request)
and as provider ``mock-batch``, which hands whole batches to the mock's own Batch API
(``batch_api = "delegate"``). A batch created with the header ``x-sluice-provider: mock-batch``
shows the delegation lifecycle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from service.core.config import ClientSettings, Settings, child_environment
from service.core.log import configure_logging, redact_url, settings_secrets
from service.devtools.ports import free_port

from . import localstack

log = structlog.get_logger("sluice.up")

# Seconds each role gets between SIGTERM and SIGKILL, from the grace it was started with: the web
# may take the grace twice (its requests, then aiohttp's own shutdown), a worker the grace and 5 s
# to record its last results (docs/deploying.md).
STOP_ORDER: tuple[tuple[str, Callable[[float], float]], ...] = (
    ("web", lambda grace: 2 * grace + 5),
    ("worker", lambda grace: grace + 10),
    ("finalizer", lambda grace: grace + 10),
    ("mock-provider", lambda grace: 10.0),
    ("redis", lambda grace: 30.0),
)


def _port_taken(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for_port(port: int, alive: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if _port_taken(port):
            return True
        time.sleep(0.1)
    return False


def dev_token(data_dir: Path) -> str:
    """The development token, kept under the data dir so its files survive a restart."""
    path = data_dir / "dev-token"
    if path.exists():
        return path.read_text().strip()
    token = f"sk-sluice-dev-{secrets.token_hex(16)}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that has Linux send the child SIGTERM when `sluice up` dies outright.

    Children live in sessions of their own (Ctrl-C must not reach them), so nothing else would
    stop them if `sluice up` were killed with SIGKILL.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        # `sluice up` killed between the fork and the prctl sends no signal: stop at once instead.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class Child:
    role: str
    popen: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def _mock_batch_config(data_dir: Path, mock_port: int) -> Path:
    """A providers file adding ``mock-batch``: the mock's own Batch API, chosen with x-sluice-provider."""
    path = data_dir / "sluice-up.toml"
    path.write_text(f"""# Written by `sluice up`: the mock provider's own Batch API, for batches created with
# the header x-sluice-provider: mock-batch (no model routes here by itself).
[providers.mock-batch]
base_url = "http://127.0.0.1:{mock_port}"
api_key_env = "SLUICE_UPSTREAM_API_KEY"
models = []
batch_api = "delegate"
batch_poll_s = 1.0
batch_poll_max_s = 5.0
""")
    return path


class Stack:
    """The children of `sluice up`, started in order and stopped in the order of ``STOP_ORDER``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.fake_redis: socketserver.BaseServer | None = None  # fakeredis is imported only when used
        self._preexec = _parent_death_signal()

    def spawn(self, role: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        popen = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=self._preexec
        )
        child = Child(role, popen)
        self.children.append(child)
        return child

    def sluice(self, role: str, args: list[str], env: dict[str, str]) -> Child:
        return self.spawn(role, [sys.executable, "-m", "service.cli", *args], env)

    def start_redis(self, data_dir: Path) -> str:
        port = free_port()
        binary = shutil.which("redis-server")
        if binary:
            redis_dir = data_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            child = self.spawn(
                "redis",
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                    "--logfile",
                    str(redis_dir / "redis.log"),
                ],
            )
            alive = lambda: child.alive  # noqa: E731
        else:
            try:
                from fakeredis import TcpFakeServer
            except ImportError:
                raise SystemExit(
                    "sluice up: no redis-server on PATH and fakeredis is not installed; "
                    "install redis-server or `pip install fakeredis[lua]`"
                ) from None
            print(
                "=" * 72,
                "\nWARNING: no redis-server binary found; using fakeredis's in-process TCP server.\n"
                "It keeps nothing on disk and is several times slower. Install redis-server for real use.\n",
                "=" * 72,
                sep="",
                flush=True,
            )
            server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
            threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
            self.fake_redis = server
            alive = lambda: True  # noqa: E731
        if not _wait_for_port(port, alive):
            raise SystemExit(f"sluice up: Redis did not start on port {port} (see {data_dir / 'redis' / 'redis.log'})")
        return f"redis://127.0.0.1:{port}/0"

    def exited(self) -> Child | None:
        """A child that exited by itself."""
        return next((c for c in self.children if not c.alive), None)

    def stop(self, force: threading.Event) -> None:
        """Stop the children role by role; ``force`` (a second Ctrl-C) kills what still runs."""
        grace = self.settings.shutdown_grace_s
        for role, timeout in STOP_ORDER:
            group = [c for c in self.children if c.role == role]
            if role == "redis" and self.fake_redis is not None:
                self.fake_redis.shutdown()
                log.info("redis_stopped")
                continue
            if not group:
                continue
            for c in group:
                if c.alive:
                    c.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout(grace)
            while any(c.alive for c in group) and time.monotonic() < deadline and not force.is_set():
                time.sleep(0.05)
            late = [c for c in group if c.alive]
            for c in late:
                c.popen.kill()
                c.popen.wait()
            if late and not force.is_set():
                log.warning("stop_timed_out", role=role, after_s=round(timeout(grace), 1))
            # web, worker and finalizer log their own *_stopped line.
            if role in ("mock-provider", "redis"):
                log.info(f"{role.replace('-', '_')}_stopped")


def run(settings: Settings, client: ClientSettings) -> None:
    """Start everything, print how to use it, and supervise until interrupted."""
    configure_logging(settings.log_level, process="up", secrets=settings_secrets(settings))
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stack_path = data_dir / localstack.FILE_NAME
    other = localstack.load(stack_path)
    if other is not None and other.pid != os.getpid():
        raise SystemExit(
            f"sluice up: another `sluice up` (pid {other.pid}) runs with this data dir ({data_dir}); "
            "stop it first, or give this one another SLUICE_DATA_DIR"
        )
    if _port_taken(settings.port):
        raise SystemExit(f"sluice up: port {settings.port} is already in use; stop what listens there or set PORT")

    stopping, force = threading.Event(), threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        if stopping.is_set():
            force.set()
            return
        reason.append(signal.Signals(signum).name)
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    stack = Stack(settings)
    try:
        env = child_environment()
        tokens = settings.api_tokens or (dev_token(data_dir),)
        redis_url = client.redis_url or stack.start_redis(data_dir)
        upstream = ", ".join(f"{p.name} ({p.base_url})" for p in settings.providers)
        mock_url = ""
        if not settings.providers:
            mock_port = free_port()
            stack.sluice(
                "mock-provider",
                [
                    "mock-provider",
                    "--port",
                    str(mock_port),
                    "--latency-ms",
                    "50",
                    "--batch-start-ms",
                    "1000",
                    "--batch-line-ms",
                    "20",
                ],
                env,
            )
            mock_url = f"http://127.0.0.1:{mock_port}"
            upstream = f"mock provider at {mock_url}"
            env.update({"SLUICE_UPSTREAM_URL": mock_url, "SLUICE_UPSTREAM_API_KEY": "mock-key"})
            if not env.get("SLUICE_CONFIG"):
                env["SLUICE_CONFIG"] = str(_mock_batch_config(data_dir, mock_port))
                upstream += "\n             (x-sluice-provider: mock-batch delegates a batch to its own Batch API)"
        env.update(
            {
                "REDIS_URL": redis_url,
                "PORT": str(settings.port),
                "SLUICE_DATA_DIR": str(data_dir),
                "SLUICE_API_TOKENS": ",".join(tokens),
            }
        )
        for role in ("web", "worker", "finalizer"):
            stack.sluice(role, [role], env)
        web = next(c for c in stack.children if c.role == "web")
        if not _wait_for_port(settings.port, lambda: web.alive and not stopping.is_set()):
            if not stopping.is_set():
                raise SystemExit(f"sluice up: the web process did not start on port {settings.port}")
        else:
            api = f"http://localhost:{settings.port}"
            localstack.write(
                stack_path,
                localstack.LocalStack(
                    api_url=api,
                    dashboard_url=f"{api}/dashboard/",
                    redis_url=redis_url,
                    token=tokens[0],
                    data_dir=str(data_dir),
                    pid=os.getpid(),
                    started_at=int(time.time()),
                    processes={c.role: c.popen.pid for c in stack.children},
                    upstream_url=mock_url,
                ),
            )
            print(_banner(api, tokens[0], redis_url, upstream, data_dir, stack_path), flush=True)
        while not stopping.is_set():
            gone = stack.exited()
            if gone is not None:
                log.error("child_exited", role=gone.role, pid=gone.popen.pid, returncode=gone.popen.returncode)
                reason.append(f"{gone.role} exited")
                stopping.set()
            stopping.wait(0.5)
    finally:
        stopping.set()
        stop_started = time.monotonic()
        log.info(
            "up_stopping",
            reason=reason[0] if reason else "start-up failed",
            hint="Ctrl-C again to kill everything at once",
        )
        try:
            stack.stop(force)
        finally:
            localstack.remove(stack_path, os.getpid())
        log.info("up_stopped", stop_s=round(time.monotonic() - stop_started, 1))


def _cli_command() -> str:
    """How to run this checkout's `sluice` from the current directory."""
    wrapper = localstack.CHECKOUT / "bin" / "sluice"
    if not wrapper.exists():
        return "sluice"
    try:
        return str(wrapper.relative_to(Path.cwd()))
    except ValueError:
        return str(wrapper)


def _banner(api: str, token: str, redis_url: str, upstream: str, data_dir: Path, stack_path: Path) -> str:
    cli = _cli_command()
    return f"""
Sluice is up.
  API:        {api}/v1   (the bare paths work too: {api}/files, {api}/batches)
  Dashboard:  {api}/dashboard/   (sign in with the token)
  Token:      {token}
  Redis:      {redact_url(redis_url)}
  Upstream:   {upstream}
  Data:       {data_dir}   (connection details for the CLI: {stack_path.name})

In another terminal:
  {cli} submit requests.jsonl --wait --out results/   # the CLI of this checkout finds this stack by itself
  {cli} status
  export SLUICE_TOKEN={token}   # for curl and the OpenAI SDKs
  curl -s {api}/v1/batches -H "Authorization: Bearer $SLUICE_TOKEN"
  {cli} usage     # tokens used, by day, provider and model

Ctrl-C stops everything: the web first, then the worker drains, the finalizer, Redis last.
"""
