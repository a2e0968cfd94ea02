"""The harness's switch between a single redis-server and a local Redis Cluster (tests/support/stack.py)."""

from __future__ import annotations

import pytest

from tests.support.processes import ProcessRunner
from tests.support.stack import TEST_REDIS_ENV, NotASingleRedis, Stack, StackFactory, default_redis


def test_default_redis_follows_the_environment(monkeypatch):
    monkeypatch.delenv(TEST_REDIS_ENV, raising=False)
    assert default_redis() == "single"
    monkeypatch.setenv(TEST_REDIS_ENV, "Cluster")
    assert default_redis() == "cluster"
    monkeypatch.setenv(TEST_REDIS_ENV, "sentinel")
    with pytest.raises(ValueError, match="sentinel"):
        default_redis()


def test_options_of_a_single_server_do_not_combine_with_a_cluster(tmp_path):
    factory = StackFactory(tmp_path)
    try:
        with pytest.raises(ValueError, match="redis_aof"):
            factory.start(redis="cluster", redis_aof=True)
        with pytest.raises(ValueError, match="expected one of"):
            factory.start(redis="sentinel")
    finally:
        factory.close()
    assert factory.stacks == []


def test_a_stack_without_a_single_server_says_what_to_do(tmp_path):
    runner = ProcessRunner(tmp_path / "logs")
    stack = Stack(name="c", runner=runner, redis_server=None, port=1, mock_port=2, data_dir=tmp_path, env={})
    with pytest.raises(NotASingleRedis, match="single_redis"):
        stack.redis.client()
    runner.close()
