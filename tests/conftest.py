"""Fixtures of the Sluice test suite; the machinery behind them lives in ``tests/support``.

Integration tests start real processes (``redis-server`` and ``python -m service.cli ...``) and drive
them with the official ``openai`` SDK in strict mode. Everything is bounded in time: waits poll a
condition with an explicit timeout, and processes get SIGTERM then SIGKILL at teardown, their whole
process group, even when the test failed or timed out.

Fixtures
--------
``wait_until``         :func:`tests.support.waiting.wait_until` (poll a predicate, raise on timeout).
``async_wait_until``   :func:`tests.support.waiting.async_wait_until`.
``free_port``          :func:`tests.support.ports.free_port`.
``process_runner``     a :class:`ProcessRunner` whose processes die with the test.
``redis_server``       a private ``redis-server`` (:class:`RedisServer`) for one test.
``redis_cluster``      a private Redis Cluster, 3 masters with a replica each (:class:`RedisClusterServers`), for
                       one test (marker ``cluster``).
``stack``              the session's default :class:`Stack` (redis, mock provider, web, 2 workers, finalizer).
``stack_factory``      a :class:`StackFactory` whose stacks die with the test.
``module_stack_factory`` the same, with stacks living for the whole test module.
``moto_server``        a session-wide S3-compatible server (moto's server mode, :class:`MotoServer`) on loopback.
``s3_bucket``          a fresh, empty bucket on it for one test (:class:`S3Bucket`); ``s3_bucket.env`` is the
                       environment that points Sluice processes at it.

``SLUICE_TEST_REDIS=cluster`` runs every stack that does not ask for a single Redis on a local Redis
Cluster (``make test-cluster``), and skips the tests marked ``single_redis``.

When a test fails, the tail of the logs of every process it used is attached to its report. When the
session ends, any process it started that is still alive (found by the run marker every started
process inherits) is killed, and the session fails.
"""

from __future__ import annotations

import itertools
import os

import pytest

from tests.support import processes
from tests.support.env import STARTUP_TIMEOUT_S
from tests.support.env import base_env as _base_env
from tests.support.env import sluice_cmd as _sluice_cmd
from tests.support.http import HttpResult, assert_error_envelope, http_request
from tests.support.lines import (
    CHAT_URL,
    DEFAULT_MODEL,
    chat_line,
    parse_jsonl,
    to_jsonl,
)
from tests.support.mocks import MockServer, MockSpec, start_mock
from tests.support.mocks import mock_spec as _mock_spec
from tests.support.moto import S3_CREDENTIALS, MotoServer, S3Bucket, start_moto
from tests.support.ports import free_port
from tests.support.processes import LIVE_RUNNERS as _LIVE_RUNNERS
from tests.support.processes import (
    ROOT,
    STOP_GRACE_S,
    ManagedProcess,
    ProcessDied,
    ProcessRunner,
    fail_if_died,
)
from tests.support.processes import fail_if_died as _fail_if_died
from tests.support.processes import raise_if_exited as _raise_if_exited
from tests.support.redis_cluster import RedisClusterServers, start_cluster
from tests.support.redis_server import RedisServer, start_redis
from tests.support.stack import (
    TERMINAL_STATUSES,
    TEST_REDIS_ENV,
    TOKENS,
    UPSTREAM_API_KEY,
    Stack,
    StackFactory,
    default_redis,
)
from tests.support.waiting import WaitTimeout, async_wait_until, wait_until

# Test modules written before tests/support existed import these from here: keep them working
# (new code imports from tests.support).
__all__ = [
    "CHAT_URL",
    "DEFAULT_MODEL",
    "ROOT",
    "S3_CREDENTIALS",
    "STARTUP_TIMEOUT_S",
    "STOP_GRACE_S",
    "TERMINAL_STATUSES",
    "TOKENS",
    "UPSTREAM_API_KEY",
    "HttpResult",
    "ManagedProcess",
    "MockServer",
    "MockSpec",
    "MotoServer",
    "ProcessDied",
    "ProcessRunner",
    "RedisServer",
    "S3Bucket",
    "Stack",
    "StackFactory",
    "WaitTimeout",
    "_LIVE_RUNNERS",
    "_base_env",
    "_fail_if_died",
    "_mock_spec",
    "_raise_if_exited",
    "_sluice_cmd",
    "assert_error_envelope",
    "async_wait_until",
    "chat_line",
    "free_port",
    "http_request",
    "parse_jsonl",
    "start_mock",
    "start_moto",
    "start_redis",
    "to_jsonl",
    "wait_until",
]

_RUN_ID: str | None = None


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
    try:
        yield runner
    finally:
        died = runner.close()
    fail_if_died(died, runner)


@pytest.fixture
def redis_server(tmp_path):
    runner = ProcessRunner(tmp_path / "redis-logs")
    try:
        server = start_redis(runner, tmp_path / "redis")
        yield server
    finally:
        died = runner.close()
    fail_if_died(died, runner)


@pytest.fixture
def redis_cluster(tmp_path):
    runner = ProcessRunner(tmp_path / "cluster-logs")
    try:
        yield start_cluster(runner, tmp_path / "cluster")
    finally:
        died = runner.close()
    # A master the test killed on purpose is not a death.
    fail_if_died(died, runner)


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
    fail_if_died(died, runner)


_buckets = itertools.count(1)


@pytest.fixture
def s3_bucket(moto_server):
    """A new empty bucket on the session's moto server (moto keeps it in memory until the session ends)."""
    bucket = S3Bucket(moto_server, f"sluice-test-{os.getpid()}-{next(_buckets)}")
    moto_server.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The default stack, shared by the whole session: 2 workers, concurrency 32, no mock latency.

    Its mock has gates (``mock_hold``; :meth:`MockServer.release`), for tests that need a batch to
    stay running.
    """
    factory = StackFactory(tmp_path_factory.mktemp("default-stack"))
    yield factory.start(name="default", mock=MockSpec(gates=True))
    factory.close()


# --------------------------------------------------------------------------------------------
# Hooks: the run marker, logs of failing tests, and the session-end leak check


def pytest_configure(config):
    # Before any process starts: every process of this session inherits the marker.
    global _RUN_ID
    _RUN_ID = processes.begin_run()
    # The chaos suite (test_chaos.py, test_pause.py): kills, restarts and pauses under load.
    config.addinivalue_line("markers", "chaos: kills, pauses or restarts processes while batches run (-m chaos)")


# The modules that take longest, longest first (from --durations): they start first, so that under
# --dist loadfile no worker is left running one of them alone at the end. Order only.
_SLOW_FIRST = (
    "test_client_cli.py",
    "test_cluster_e2e.py",
    "test_pause.py",
    "test_delegate.py",
    "test_chaos.py",
    "test_bench_smoke.py",
    "test_lost_replies.py",
    "test_exact_counters.py",
    "test_quotas_and_tokens.py",
    "test_readme.py",
    "test_up.py",
    "test_resilience.py",
    "test_failover.py",
    "test_dashboard.py",
    "test_redis_cluster_connect.py",
    "test_redis_cluster.py",
    "test_deploy.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order
    if default_redis() == "cluster":
        skip = pytest.mark.skip(
            reason=f"{TEST_REDIS_ENV}=cluster: this test needs its stack's single redis-server (marker single_redis)"
        )
        for item in items:
            if item.get_closest_marker("single_redis"):
                item.add_marker(skip)


def _runners_of(item: pytest.Item) -> list[ProcessRunner]:
    found: list[ProcessRunner] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ProcessRunner):
            found.append(value)
        elif isinstance(value, Stack):
            found.append(value.runner)
        elif isinstance(value, StackFactory):
            found.extend(s.runner for s in value.stacks)
        elif isinstance(value, (RedisServer, RedisClusterServers)):
            found.append(value.runner)
    return [r for r in dict.fromkeys(found) if not r.closed]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for runner in _runners_of(item):
            for proc in runner.processes:
                report.sections.append((f"log tail: {proc.describe()}", proc.tail()))


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config) -> bool:
    return config.pluginmanager.get_plugin("dsession") is not None


_WORKER_LEAKS: list[str] = []  # on the xdist controller: the leak reports its workers sent


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown to a run without the plugin
def pytest_testnodedown(node, error):
    # On the xdist controller: a worker's own leak check ran in its sessionfinish and sent its report.
    report = getattr(node, "workeroutput", {}).get("leaked_processes")
    if report:
        _WORKER_LEAKS.append(f"[{node.gateway.id}] {report}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # trylast: after pytest's own sessionfinish has torn down the remaining fixtures (and, on an xdist
    # controller, after xdist has shut its workers down).
    processes.close_all_runners()
    if _RUN_ID is None:
        return
    # Each xdist worker has a run id of its own (its marker extends the controller's), so it judges only
    # what its own tests started. The controller starts no test process: its scan is the backstop for a
    # worker that died before its own check, and skips the workers themselves (its direct children).
    workers = processes.children_of(os.getpid()) if _xdist_controller(session.config) else set()
    leaked = processes.kill_leftovers(_RUN_ID, spare=workers)
    reports = list(_WORKER_LEAKS)
    if leaked:
        lines = "\n".join(f"  {desc}" for desc in leaked.values())
        reports.append(
            f"{len(leaked)} process(es) started by this test session were still running at its end "
            f"(now killed):\n{lines}"
        )
    if not reports:
        return
    message = "\n".join(reports)
    if _xdist_worker(session.config):
        # A worker's terminal output is not shown: the controller prints this (pytest_testnodedown).
        session.config.workeroutput["leaked_processes"] = message
    else:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "leaked processes", red=True)
            reporter.write_line(message)
        else:
            print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
