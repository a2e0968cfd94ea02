"""The cluster scenario's arithmetic (bench/cluster.py): command shares and the scale-out ceiling."""

from __future__ import annotations

import pytest

from bench.cluster import CEILING_FORMULA, ceiling, command_shares, render


def test_command_shares_leave_the_harness_commands_out():
    stats = {
        "a": {
            "evalsha": {"calls": 60},
            "hset": {"calls": 40},
            "info": {"calls": 500},
            "config|resetstat": {"calls": 1},
        },
        "b": {"xreadgroup": {"calls": 100}, "cluster|slots": {"calls": 7}},
        "c": {"smembers": {"calls": 100}},
    }
    shares = command_shares(stats)
    assert {n: v["calls"] for n, v in shares.items()} == {"a": 100, "b": 100, "c": 100}
    assert [v["share"] for v in shares.values()] == pytest.approx([1 / 3] * 3, abs=1e-3)


def test_ceiling_is_one_over_the_busiest_masters_cpu_per_line_times_masters():
    got = ceiling({"a": 50e-6, "b": 10e-6, "c": 5e-6}, 3)
    assert got["busiest_master"] == "a" and got["busiest_cpu_us_per_line"] == 50.0
    assert got["lines_per_s_per_redis_core"] == 20_000.0
    assert got["cluster_lines_per_s_balanced"] == 60_000.0
    assert got["formula"] == CEILING_FORMULA
    assert ceiling({"a": 0.0}, 1)["lines_per_s_per_redis_core"] is None


def test_render_names_every_node_and_the_formula():
    run = {
        "label": "Sluice 2w, cluster",
        "lines": 1000,
        "e2e_s": 2.0,
        "lines_per_s": 500.0,
        "redis_nodes": {
            "127.0.0.1:1": {"role": "master", "cpu_s": 0.05, "cpu_us_per_line": 50.0, "calls": 9000, "share": 0.9},
            "127.0.0.1:2": {"role": "slave", "cpu_s": 0.01, "cpu_us_per_line": 10.0},
        },
        "ceiling": ceiling({"127.0.0.1:1": 50e-6}, 3),
    }
    text = "\n".join(render(run))
    assert "127.0.0.1:1" in text and "127.0.0.1:2" in text and "90.0%" in text
    assert CEILING_FORMULA in text and "20000.0 lines/s per Redis core" in text and "60000.0 lines/s" in text
