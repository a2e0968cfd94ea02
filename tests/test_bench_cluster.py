"""The cluster scenario's arithmetic (bench/cluster.py): the split over shards, command shares and
the ceiling."""

from __future__ import annotations

import pytest

from bench.cluster import (
    CEILING_FORMULA,
    ceiling,
    command_shares,
    commands_per_line,
    render,
    split_lines,
    write_parts,
)
from bench.scenarios import write_batch_file


def test_split_lines_covers_every_line_once_in_order():
    assert split_lines(20_000, 16) == [(1 + 1250 * i, 1250) for i in range(16)]
    smoke = split_lines(40, 16)
    assert len(smoke) == 16 and sum(n for _, n in smoke) == 40 and {n for _, n in smoke} == {2, 3}
    assert [first for first, _ in smoke] == [1 + sum(n for _, n in smoke[:i]) for i in range(16)]
    assert split_lines(5, 16) == [(n, 1) for n in range(1, 6)]


def test_write_parts_cuts_the_input_file_into_its_lines(tmp_path):
    whole = tmp_path / "all.jsonl"
    write_batch_file(whole, 40, None)
    parts = write_parts(whole, tmp_path, 16)
    assert b"".join(p.path.read_bytes() for p in parts) == whole.read_bytes()
    for part in parts:
        lines = part.path.read_text().splitlines()
        assert len(lines) == part.lines and f'"req-{part.first}"' in lines[0]


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


def test_commands_per_line_sums_the_masters_and_keeps_the_top_ones():
    stats = {
        "a": {"hincrby": {"calls": 300}, "xadd": {"calls": 200}, "info": {"calls": 900}},
        "b": {"hincrby": {"calls": 100}, "smembers": {"calls": 50}, "hello": {"calls": 3}},
    }
    assert commands_per_line(stats, 100, top=2) == {
        "hincrby": 4.0,
        "xadd": 2.0,
        "other": 0.5,
        "total": 6.5,
    }
    assert commands_per_line(stats, 100, top=None) == {
        "hincrby": 4.0,
        "xadd": 2.0,
        "smembers": 0.5,
        "other": 0.0,
        "total": 6.5,
    }


def test_ceiling_divides_the_lines_by_all_masters_and_by_the_busiest_masters_cpu_seconds():
    got = ceiling({"a": 2.0, "b": 1.5, "c": 0.5}, 20_000)
    assert got["formula"] == CEILING_FORMULA and got["masters"] == 3
    assert got["busiest_master"] == "a" and got["busiest_cpu_s"] == 2.0 and got["masters_cpu_s"] == 4.0
    assert got["busiest_share_of_masters_cpu"] == 0.5
    assert got["lines_per_s_per_redis_core"] == 5_000.0
    assert got["cluster_ceiling_lines_per_s"] == 10_000.0
    idle = ceiling({"a": 0.0}, 10)
    assert idle["lines_per_s_per_redis_core"] is None and idle["cluster_ceiling_lines_per_s"] is None


def test_render_names_every_node_the_formula_and_the_end_to_end_rate():
    run = {
        "label": "Sluice 2w, cluster",
        "lines": 1000,
        "batches": [{}] * 16,
        "e2e_s": 2.0,
        "lines_per_s": 500.0,
        "upload_s": 0.5,
        "extra_uploads": 0,
        "redis_nodes": {
            "127.0.0.1:1": {
                "role": "master",
                "shards": 6,
                "cpu_s": 0.05,
                "cpu_us_per_line": 50.0,
                "calls": 9000,
                "share": 0.9,
            },
            "127.0.0.1:2": {"role": "slave", "cpu_s": 0.01, "cpu_us_per_line": 10.0},
        },
        "ceiling": ceiling({"127.0.0.1:1": 0.05, "127.0.0.1:3": 0.05}, 1000),
    }
    text = "\n".join(render(run))
    assert "127.0.0.1:1" in text and "127.0.0.1:2" in text and "90.0%" in text
    assert "16 batches" in text and "500.0 lines/s end to end" in text
    assert CEILING_FORMULA in text
    assert "10000.0 lines/s per Redis core" in text and "cluster ceiling 20000.0 lines/s" in text
