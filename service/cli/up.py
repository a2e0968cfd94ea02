"""``sluice up``: the whole stack on one machine with nothing configured.

Starts a Redis of its own (a ``redis-server`` child on a free port, data under
``$SLUICE_DATA_DIR/redis``; fakeredis's TCP server in-process where no binary exists), the mock
provider unless ``SLUICE_UPSTREAM_URL`` is set, then the web front end, one worker and the
finalizer as child processes. Ctrl-C (or SIGTERM) stops every child.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.core.config import Settings
from service.core.log import redact_url
from service.devtools.ports import free_port

STOP_TIMEOUT_S = 25.0


def _wait_for_port(port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
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


def _start_redis(data_dir: Path, children: list[subprocess.Popen]) -> str:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary:
        redis_dir = data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        children.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
             "--appendonly", "yes", "--save", "", "--logfile", str(redis_dir / "redis.log")],
        ))
    else:
        try:
            from fakeredis import TcpFakeServer
        except ImportError:
            raise SystemExit("sluice up: no redis-server on PATH and fakeredis is not installed; "
                             "install redis-server or `pip install fakeredis[lua]`") from None
        print("=" * 72, "\nWARNING: no redis-server binary found; using fakeredis's in-process TCP server.\n"
              "It keeps nothing on disk and is several times slower. Install redis-server for real use.\n",
              "=" * 72, sep="", flush=True)
        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
    if not _wait_for_port(port):
        raise SystemExit(f"sluice up: Redis did not start on port {port}")
    return f"redis://127.0.0.1:{port}/0"


def _child(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", *cmd], env=env)


def run(settings: Settings) -> None:
    """Start everything, print how to use it, and supervise until interrupted."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        env = dict(os.environ)
        tokens = settings.api_tokens or (dev_token(data_dir),)
        redis_url = os.environ.get("REDIS_URL") or _start_redis(data_dir, children)
        upstream = ", ".join(f"{p.name} ({p.base_url})" for p in settings.providers)
        if not settings.providers:
            mock_port = free_port()
            children.append(_child(["mock-provider", "--port", str(mock_port), "--latency-ms", "50"], env))
            upstream = f"mock provider at http://127.0.0.1:{mock_port}"
            env.update({"SLUICE_UPSTREAM_URL": f"http://127.0.0.1:{mock_port}", "SLUICE_UPSTREAM_API_KEY": "mock-key"})
        env.update({
            "REDIS_URL": redis_url, "PORT": str(settings.port), "SLUICE_DATA_DIR": str(data_dir),
            "SLUICE_API_TOKENS": ",".join(tokens),
        })
        for cmd in (["web"], ["worker"], ["finalizer"]):
            children.append(_child(cmd, env))
        if not _wait_for_port(settings.port):
            raise SystemExit(f"sluice up: the web process did not start on port {settings.port}")
        print(_banner(dataclasses.replace(settings, redis_url=redis_url), tokens[0], upstream), flush=True)
        while not stopping.is_set():
            for child in children:
                if child.poll() is not None:
                    print(f"sluice up: {' '.join(child.args[-1:])} exited with {child.returncode}; stopping",
                          file=sys.stderr, flush=True)
                    stopping.set()
            stopping.wait(0.5)
    finally:
        _stop(children)


def _stop(children: list[subprocess.Popen]) -> None:
    # Redis (the first child, when started here) stops last: the others drain into it.
    for group in (children[:0:-1], children[:1]):
        for child in group:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in group:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _banner(settings: Settings, token: str, upstream: str) -> str:
    url = f"http://localhost:{settings.port}"
    return f"""
Sluice is up.
  API:       {url}/v1   (also on the bare paths: {url}/files, {url}/batches)
  Token:     {token}
  Redis:     {redact_url(settings.redis_url)}
  Upstream:  {upstream}
  Data:      {settings.data_dir.resolve()}

Try it:
  export SLUICE_TOKEN={token}
  curl -s {url}/v1/batches -H "Authorization: Bearer $SLUICE_TOKEN"

Ctrl-C stops everything.
"""
