"""A Sluice stack of real processes: redis-server, mock provider(s), web, workers and finalizer.

:class:`StackFactory` starts :class:`Stack` s (see its ``start`` for every option); each stack's
processes belong to one :class:`ProcessRunner`, so closing the factory stops them all.

Multi-host stacks: ``stack_factory.start(separate_data_dirs=True, env=s3_bucket.env)`` gives every Sluice
process (and every one :meth:`Stack.spawn` starts) its own ``SLUICE_DATA_DIR`` under the stack's data dir,
as separate hosts would have: they share only Redis and the object store.

Redis Cluster stacks: ``stack_factory.start(redis="cluster")`` starts a local cluster (3 masters with a
replica each, :func:`start_cluster`) instead of a single ``redis-server`` and points ``REDIS_URL`` at one
of its nodes; :attr:`Stack.cluster` then has its helpers (``kill_master``, ``failover``,
``commandstats``). ``SLUICE_TEST_REDIS=cluster`` in the environment makes that the default of every
stack that does not ask for a single Redis (``redis="single"``, ``redis_aof`` or ``redis_via``), so the
end-to-end tests run unchanged on a cluster (``make test-cluster``). Tests that need the single server
itself (keys read by name, a restart, a proxy, TLS) carry the marker ``single_redis``, which skips them
under that switch; :attr:`Stack.redis` on a cluster stack fails and says so.

Multi-provider stacks: ``stack_factory.start(upstream=False, extra_mocks={"p1": {"record": True}},
config_toml=...)`` starts more mock providers and writes ``config_toml`` (a :class:`string.Template`:
``${mock_url}`` is the default mock, ``${p1_url}`` the mock called ``p1``) to a file named by
``SLUICE_CONFIG``. ``upstream=False`` leaves ``SLUICE_UPSTREAM_URL`` unset. A mock with
``record=True`` also keeps every API request it got (:meth:`MockServer.requests`); one with
``gates=True`` holds requests until the test releases them (:meth:`MockServer.release`).
"""

from __future__ import annotations

import os
import signal
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import processes
from .env import STARTUP_TIMEOUT_S, base_env, sluice_cmd
from .http import HttpResult, assert_error_envelope, http_request, wait_for_200
from .lines import CHAT_URL, chat_line, parse_jsonl, to_jsonl
from .mocks import MockServer, MockSpec, mock_spec, start_mock
from .ports import free_port
from .processes import ROOT, ManagedProcess, ProcessDied, ProcessRunner, fail_if_died
from .redis_cluster import RedisClusterServers, start_cluster
from .redis_server import RedisServer, start_redis
from .waiting import WaitTimeout, wait_until

TOKENS = ("tok-a", "tok-b")
UPSTREAM_API_KEY = "upstream-secret"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
# Which Redis the stacks get when a test does not say: "single" (a redis-server) or "cluster".
TEST_REDIS_ENV = "SLUICE_TEST_REDIS"
REDIS_KINDS = ("single", "cluster")


def default_redis() -> str:
    """The kind of Redis a stack gets unless it asks (``SLUICE_TEST_REDIS``, default ``single``)."""
    kind = os.environ.get(TEST_REDIS_ENV, "").strip().lower() or "single"
    if kind not in REDIS_KINDS:
        raise ValueError(f"{TEST_REDIS_ENV}={kind!r}: expected one of {', '.join(REDIS_KINDS)}")
    return kind


class NotASingleRedis(AssertionError):
    """A test reached for the single redis-server of a stack that runs on a Redis Cluster."""


_DEFAULT = object()


@dataclass
class Stack:
    """Redis + mock provider + web + workers + finalizer, all real processes.

    ``base_url`` is the web root (bare paths), ``api_url`` the same with ``/v1``. A stack runs on
    either a single ``redis-server`` (``redis_server``; :attr:`redis`) or a local Redis Cluster
    (:attr:`cluster`).
    """

    name: str
    runner: ProcessRunner
    redis_server: RedisServer | None
    port: int
    mock_port: int
    data_dir: Path
    env: dict[str, str]
    tokens: tuple[str, ...] = TOKENS
    mocks: dict[str, MockServer] = field(default_factory=dict)
    config_path: Path | None = None
    separate_data_dirs: bool = False
    cluster: RedisClusterServers | None = None
    _clients: list[Any] = field(default_factory=list, repr=False)

    # Pure helpers, reachable from tests through the fixture.
    chat_line = staticmethod(chat_line)
    to_jsonl = staticmethod(to_jsonl)
    parse_jsonl = staticmethod(parse_jsonl)
    assert_error = staticmethod(assert_error_envelope)

    @property
    def redis(self) -> RedisServer:
        """The stack's single ``redis-server``; a cluster stack has none (see :attr:`cluster`)."""
        if self.redis_server is None:
            raise NotASingleRedis(
                f"stack {self.name!r} runs on a Redis Cluster ({TEST_REDIS_ENV}=cluster or redis='cluster'): "
                "a test that reads Redis keys by name or needs the single server must carry "
                "@pytest.mark.single_redis (skipped under the switch) or start its stack with redis='single'"
            )
        return self.redis_server

    @property
    def on_cluster(self) -> bool:
        return self.cluster is not None

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
        return self.runner.start(name or role, sluice_cmd(role), env=env)

    def kill_and_replace(self, role: str) -> None:
        """SIGKILL the first live process of ``role`` and start a fresh one (a web one: until healthy).

        ``"redis"`` SIGKILLs the stack's single ``redis-server`` and restarts it on the same port.
        """
        if role == "redis":
            self.redis.restart(sig=signal.SIGKILL)
            return
        victim = next(p for p in self.processes if p.name.split("-")[0] == role and p.alive and not p.stopping)
        victim.stopping = True
        victim.signal(signal.SIGKILL)
        victim.popen.wait(timeout=10)
        self.spawn(role)
        if role == "web":
            self.wait_healthy()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        wait_for_200(f"{self.base_url}/healthz", what="web", timeout=timeout, check=self.check_alive)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until ``GET /readyz`` answers 200 (the web process reaches Redis and its storage)."""
        wait_for_200(f"{self.base_url}/readyz", what="web", timeout=timeout, check=self.check_alive, request_timeout=5)

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
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``python -m service.cli ARGS`` with this stack's environment; capture text output.

        ``timeout`` is a failure deadline: on expiry the command's whole process group is killed.
        """
        proc = processes.run(sluice_cmd(*args), env={**self.env, **(env or {})}, cwd=ROOT, timeout=timeout)
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
        redis: str | None = None,
        stop_grace: float = processes.STOP_GRACE_S,
        log_dir: Path | None = None,
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
        ``redis`` is ``"single"`` (a ``redis-server``) or ``"cluster"`` (a local cluster, 3 masters with a
        replica each; :attr:`Stack.cluster`); by default ``SLUICE_TEST_REDIS`` decides, except that
        ``redis_aof`` and ``redis_via`` ask for a single server.
        ``stop_grace`` is how long the processes get between SIGTERM and SIGKILL when the stack stops;
        ``log_dir`` is where their logs go (default ``<stack>/logs``).
        """
        if mock is None:
            mock = MockSpec(latency_ms=mock_latency_ms, error_rate=mock_error_rate)
        elif mock_latency_ms is not None or mock_error_rate is not None:
            raise ValueError("give the default mock's options either as mock=MockSpec(...) or as mock_*, not both")
        mock = mock_spec(mock)
        extra_specs = {n: mock_spec(spec) for n, spec in (extra_mocks or {}).items()}
        for mock_name in extra_specs:
            if mock_name == "default" or not mock_name.isidentifier():
                raise ValueError(f"bad extra mock name {mock_name!r}: an identifier other than 'default'")
        if redis is None:
            redis = "single" if redis_aof or redis_via is not None else default_redis()
        if redis not in REDIS_KINDS:
            raise ValueError(f"redis={redis!r}: expected one of {', '.join(REDIS_KINDS)}")
        if redis == "cluster" and (redis_aof or redis_via is not None):
            raise ValueError("redis_aof and redis_via apply to a single redis-server, not to redis='cluster'")
        name = name or f"stack{len(self.stacks) + 1}"
        root = self.base_dir / name
        runner = ProcessRunner(log_dir or root / "logs", grace=stop_grace)
        try:
            redis_server: RedisServer | None = None
            cluster: RedisClusterServers | None = None
            if redis == "cluster":
                cluster = start_cluster(runner, root / "cluster")
                redis_url = cluster.url
            else:
                redis_server = start_redis(runner, root / "redis", appendonly=redis_aof)
                redis_url = redis_via(redis_server) if redis_via is not None else redis_server.url
            data_dir = root / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            env0 = base_env()

            mocks = {"default": start_mock(runner, "default", mock, env=env0)}
            for mock_name, spec in extra_specs.items():
                mocks[mock_name] = start_mock(runner, mock_name, spec, env=env0)
            mock_port = mocks["default"].port

            sluice_env = {
                **env0,
                "REDIS_URL": redis_url,
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
            runner.start("web", sluice_cmd("web"), env={**own("web"), "PORT": str(web_port)})
            for i in range(workers):
                runner.start(f"worker-{i + 1}", sluice_cmd("worker"), env=own(f"worker-{i + 1}"))
            if finalizer:
                runner.start("finalizer", sluice_cmd("finalizer"), env=own("finalizer"))

            stack = Stack(
                name=name,
                runner=runner,
                redis_server=redis_server,
                cluster=cluster,
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
        """Stop every stack (all of them, whatever goes wrong); fail if a process had died unasked."""
        problems = []
        stacks, self.stacks = list(reversed(self.stacks)), []
        try:
            for stack in stacks:
                died = stack.close()
                if died:
                    problems.append((died, stack.runner))
        finally:
            for stack in stacks:
                stack.runner.close()  # a no-op for the ones already closed
        for died, runner in problems:
            fail_if_died(died, runner)
