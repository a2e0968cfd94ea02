"""``sluice migrate-keys`` on a deployment made by the version before the sharded key layout.

The old version (commit d24a1ef, taken with ``git archive``) runs its web, worker and finalizer on a
private Redis: a managed token, files, a finished batch, and a batch left ``in_progress`` with its
lines in their stream (no worker runs by then). Its processes are stopped, the migration runs
(refused while their heartbeats are fresh, then forced, then once more), and the new version's
processes, on the same Redis and data directory, serve what the old ones left and finish the batch.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from service.core import keys, migrate, store
from service.core.config import Settings
from service.core.connections import connect
from service.core.storage import LocalStorage
from tests.support import processes
from tests.support.env import base_env, sluice_cmd
from tests.support.http import wait_for_200
from tests.support.lines import chat_line, parse_jsonl, to_jsonl
from tests.support.mocks import MockSpec, start_mock
from tests.support.ports import free_port
from tests.support.processes import ROOT, ProcessRunner
from tests.support.redis_server import start_redis
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.single_redis, pytest.mark.timeout(240)]

OLD_COMMIT = "d24a1ef"
TOKEN = "migrate-static-token"
OLD_METRICS = ("lines", "upstream", "latency", "tokens")


def _old_tree(dest: Path) -> Path:
    dest.mkdir()
    archive = subprocess.run(
        ["git", "archive", OLD_COMMIT, "service", "workers"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _client(port: int, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=30.0)


def _sums(r, names) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, hashes in names.items():
        total: dict[str, int] = {}
        for h in hashes:
            for f, v in r.hgetall(h).items():
                total[f.decode()] = total.get(f.decode(), 0) + int(float(v))
        out[name] = total
    return out


def test_a_deployment_of_the_old_layout_runs_on_after_migrate_keys(tmp_path: Path) -> None:
    old = _old_tree(tmp_path / "old")
    runner = ProcessRunner(tmp_path / "logs")
    try:
        redis_server = start_redis(runner, tmp_path / "redis")
        mock = start_mock(runner, "default", MockSpec(), env=base_env())
        mock.wait_ready(runner)
        env = {
            **base_env(),
            "REDIS_URL": redis_server.url,
            "SLUICE_DATA_DIR": str(tmp_path / "data"),
            "SLUICE_API_TOKENS": TOKEN,
            "SLUICE_UPSTREAM_URL": mock.url,
            "SLUICE_UPSTREAM_API_KEY": "sk-mock",
            "SLUICE_SHUTDOWN_GRACE_S": "2",
            "SLUICE_LOG_LEVEL": "info",
        }
        old_env = {**env, "PYTHONPATH": str(old)}
        old_cmd = [sys.executable, "-m", "service.cli"]
        port = free_port()

        # ---- the old version at work
        managed = processes.run(
            [*old_cmd, "tokens", "create", "--name", "kept"], env=old_env, cwd=old, timeout=60
        ).stdout.strip()
        assert managed, "the old version made no token"
        web = runner.start("old-web", [*old_cmd, "web"], env={**old_env, "PORT": str(port)}, cwd=old)
        worker = runner.start("old-worker", [*old_cmd, "worker"], env=old_env, cwd=old)
        fin = runner.start("old-finalizer", [*old_cmd, "finalizer"], env=old_env, cwd=old)
        wait_for_200(f"http://127.0.0.1:{port}/healthz", what="old web", timeout=60, check=runner.check_alive)
        client = _client(port, TOKEN)
        done_file = client.files.create(
            file=("done.jsonl", to_jsonl([chat_line(f"d{i}", f"hi {i}") for i in range(4)])), purpose="batch"
        )
        done = client.batches.create(
            input_file_id=done_file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until(
            lambda: client.batches.retrieve(done.id).status == "completed",
            timeout=90,
            check=runner.check_alive,
            message="old batch completes",
        )
        # Killed, as a crashed worker: its last heartbeat stays fresh and the migration refuses to run.
        runner.stop([worker], sig=signal.SIGKILL)
        open_file = _client(port, managed).files.create(
            file=("open.jsonl", to_jsonl([chat_line(f"o{i}", f"yo {i}") for i in range(6)])), purpose="batch"
        )
        running = _client(port, managed).batches.create(
            input_file_id=open_file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        r = redis_server.client()
        wait_until(lambda: r.xlen(f"sluice:{{{running.id}}}:lines") == 6, timeout=60, message="old web feeds the batch")
        assert client.batches.retrieve(done.id).request_counts.completed == 4
        runner.stop([web, fin])
        before = _sums(r, {m: [f"sluice:metrics:{m}"] for m in OLD_METRICS})
        assert before["lines"]["completed"] == 4

        # ---- the migration
        def migrate_keys(*args: str) -> subprocess.CompletedProcess:
            return processes.run(sluice_cmd("migrate-keys", *args), env=env, timeout=120)

        refused = migrate_keys()
        assert refused.returncode == 2 and "old-worker" in refused.stderr or "beat in the last" in refused.stderr, (
            refused
        )
        dry = migrate_keys("--dry-run", "--force")
        assert dry.returncode == 0 and f"sluice:{{{running.id}}}:lines" in dry.stdout, dry.stdout
        assert r.exists(f"sluice:{{{running.id}}}:lines")
        first = migrate_keys("--force")
        assert first.returncode == 0, first.stdout + first.stderr
        second = migrate_keys("--force")
        assert second.returncode == 0 and "nothing to migrate" in second.stdout, second.stdout + second.stderr
        left = [k.decode() for k in r.scan_iter(match="sluice:*") if b"{" not in k]
        assert sorted(left) == sorted(["sluice:seq", *(k for k in left if k.startswith("sluice:history:"))]), left
        after = _sums(r, {m: [getattr(keys, f"metrics_{m}")(s) for s in range(keys.SHARDS)] for m in OLD_METRICS})
        assert after == before
        assert int(r.get(keys.lease_seq(keys.finalizer(running.id)))) >= 1
        assert r.sismember(keys.live_batches(keys.shard_of(running.id)), running.id)

        async def audit() -> int:
            ar = connect(Settings(redis_url=redis_server.url), max_connections=4)
            try:
                return await store.audit_usage(ar, LocalStorage(tmp_path / "data"), "test-audit")
            finally:
                await ar.aclose()

        assert asyncio.run(audit()) == 0, "the audit repaired a migrated owner's usage"

        # ---- the new version carries on
        new_port = free_port()
        runner.start("web", sluice_cmd("web"), env={**env, "PORT": str(new_port)})
        runner.start("worker", sluice_cmd("worker"), env=env)
        runner.start("finalizer", sluice_cmd("finalizer"), env=env)
        wait_for_200(f"http://127.0.0.1:{new_port}/healthz", what="web", timeout=60, check=runner.check_alive)
        client = _client(new_port, TOKEN)
        owner_client = _client(new_port, managed)  # a managed token of the old version authenticates
        listed = {b.id: b for b in client.batches.list()}
        assert listed[done.id].status == "completed" and listed[done.id].request_counts.completed == 4
        assert {f.id for f in client.files.list()} >= {done_file.id, listed[done.id].output_file_id}
        outputs = parse_jsonl(client.files.content(listed[done.id].output_file_id).text)
        assert sorted(o["custom_id"] for o in outputs) == [f"d{i}" for i in range(4)]
        assert client.files.content(done_file.id).text.count("\n") == 4
        finished = wait_until(
            lambda: (b := owner_client.batches.retrieve(running.id)).status == "completed" and b,
            timeout=120,
            message="the batch left in_progress completes",
        )
        assert finished.request_counts.completed == 6
        results = parse_jsonl(owner_client.files.content(finished.output_file_id).text)
        assert sorted(o["custom_id"] for o in results) == sorted(f"o{i}" for i in range(6))
        assert migrate.RECENT_S == 60
    finally:
        runner.close()
