"""A private ``redis-server`` per test (never the shared one on 6379)."""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .env import STARTUP_TIMEOUT_S
from .ports import free_port
from .processes import (
    ManagedProcess,
    ProcessDied,
    ProcessRunner,
    raise_if_exited,
    skip_or_raise,
)
from .waiting import wait_until

# redis-server rewrites its process title over its environment, which would erase the run marker
# the leak scan looks for: keep the title (and so the environment) as started.
REDIS_KEEP_ENVIRON = ["--set-proc-title", "no"]


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
            timeout=STARTUP_TIMEOUT_S,
            message=f"redis-server on port {port} to answer PING",
            ignore=(redis.ConnectionError, redis.TimeoutError, OSError),
            check=lambda: raise_if_exited(proc),
        )
    finally:
        client.close()


def start_redis(runner: ProcessRunner, workdir: Path, *, attempts: int = 3, appendonly: bool = False) -> RedisServer:
    """Start a private ``redis-server`` on a free port (never the shared 6379) and wait for PING.

    ``appendonly`` turns AOF persistence on, as a managed Redis has it, so a restart keeps data.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        skip_or_raise("redis-server is not on PATH (`make test` and `make bench` install it)")
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: BaseException | None = None
    for _ in range(attempts):
        port = free_port()
        proc = runner.start(
            "redis",
            [exe, "--port", str(port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir)]
            + REDIS_KEEP_ENVIRON,
            stop_stage=0,
        )
        try:
            _wait_for_ping(port, proc)
            return RedisServer(port, f"redis://127.0.0.1:{port}/0", proc, runner)
        except ProcessDied as exc:  # most likely the port was taken in the meantime: retry
            last_error = exc
            proc.stopping = True
    raise AssertionError(f"could not start redis-server: {last_error}")
