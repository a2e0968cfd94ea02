"""Sluice end to end on a local Redis Cluster (3 masters, a replica each), through the public API only.

One stack for the module (``redis="cluster"``): the README flow with the OpenAI SDK; how Sluice's
Redis commands spread over the masters while 32 batches run; a chaos run (Sluice processes
SIGKILLed and a master failed over mid-batch); and a batch that lives through a coordinated
``CLUSTER FAILOVER`` and a SIGKILLed master. Every batch must end with each custom_id exactly once
across its output and error files. Nothing here reads a Redis key by name: the only Redis calls
are the cluster fixture's own (roles, INFO commandstats, CONFIG RESETSTAT, failovers, a kill).

Lines that must still be in flight when the test acts wait at the mock's gates (``mock_hold``) until
the test releases them, so no step depends on how fast the machine is. The failover test runs last:
the master it kills leaves one master without a replica. It picks its targets by INFO commandstats
(the master serving most of Sluice's commands while its one batch runs), not by key names.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from typing import Any

import openai
import pytest

from tests.support.mocks import MockSpec
from tests.support.waiting import wait_until as _poll

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(240)]

TERMINAL = ("completed", "failed", "cancelled", "expired")
# Transient Redis or process faults may only ever end a line this way (the poison-line bound).
ACCEPTED_ERROR_CODES = {"poison_line"}
# docs/cluster-design.md: 16 shards; a file's shard is the last hex digit of its id, and a batch
# takes its input file's shard.
SHARDS = 16
BATCHES_PER_SHARD = 2
MAX_UPLOADS = 400
# What the cluster fixture sends to the masters while the test measures (reset_stats, commandstats,
# roles: a connection's HELLO and CLIENT SETINFO, then INFO or CONFIG RESETSTAT), and the replicas'
# REPLCONF acks: not Sluice's commands.
FIXTURE_COMMANDS = ("info", "hello", "client|", "config|", "cluster|", "replconf")
CHAOS_LINES = int(os.environ.get("SLUICE_CLUSTER_CHAOS_LINES", "2000"))
CHAOS_KILLS = 4
CHAOS_ROLES = ("web", "worker", "worker", "finalizer")
API_DOWN = (openai.APIConnectionError, openai.InternalServerError, openai.APITimeoutError)


@pytest.fixture(scope="module")
def cstack(module_stack_factory):
    return module_stack_factory.start(
        name="cluster",
        redis="cluster",
        workers=2,
        worker_concurrency=32,
        mock=MockSpec(gates=True),
        env={
            # Short leases: work held by a killed process (or stuck behind a dead master) moves on soon.
            "SLUICE_LEASE_S": "2",
            "SLUICE_MAX_ATTEMPTS": "8",
            # A small window: the web process is killed while it feeds, not only while it validates.
            "SLUICE_WINDOW_LINES": "300",
            # The provider's limiter keys live in one slot by design (docs/cluster-design.md, providers);
            # without adaptive concurrency the per-request traffic is the batches' own, which the
            # balance test measures.
            "SLUICE_ADAPTIVE_CONCURRENCY": "off",
        },
    )


# ----------------------------------------------------------------------------- helpers


def _summary(batch: Any) -> str:
    if batch is None:
        return "no batch object"
    return (
        f"batch {batch.id} status={batch.status} counts={batch.request_counts} errors={batch.errors} "
        f"output={batch.output_file_id} error_file={batch.error_file_id}"
    )


def _wait_terminal(stack, client, batch_id: str, wait_until, *, timeout: float = 120.0, what: str = ""):
    """The batch once terminal; polls through the moments the web or a master is down."""
    last: list[Any] = [None]

    def done():
        last[0] = client.batches.retrieve(batch_id)
        return last[0] if last[0].status in TERMINAL else None

    return wait_until(
        done,
        timeout=timeout,
        interval=0.2,
        ignore=API_DOWN,
        message=lambda: f"{what}batch to end; last seen: {_summary(last[0])}",
        check=stack.check_alive,
    )


def _progress(client, batch_id: str) -> int | None:
    try:
        counts = client.batches.retrieve(batch_id).request_counts
    except API_DOWN:
        return None
    return counts.completed + counts.failed


def _results(stack, client, batch) -> tuple[list[dict], list[dict]]:
    # A download may meet a failover in progress: retry it, never the assertion.
    return _poll(
        lambda: stack.results(batch, client=client),
        timeout=60,
        interval=0.5,
        ignore=API_DOWN,
        message=f"results of {batch.id}",
    )


def _assert_exactly_once(stack, client, batch, expected: set[str], *, context: str = "") -> tuple[list, list]:
    """Every expected custom_id exactly once across the output and error files, counts equal to the files."""
    output, errors = _results(stack, client, batch)
    seen = Counter(line["custom_id"] for line in output + errors)
    missing = sorted(expected - set(seen))
    extra = sorted(set(seen) - expected)
    twice = sorted((cid, n) for cid, n in seen.items() if n > 1)
    if missing or extra or twice:
        raise AssertionError(
            f"{context}{_summary(batch)}: {len(output)} output + {len(errors)} error lines for {len(expected)} "
            f"requests; {len(missing)} missing {missing[:10]}, {len(twice)} duplicated {twice[:10]}, "
            f"{len(extra)} unexpected {extra[:10]}"
        )
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(expected), len(output), len(errors)), (
        f"{context}counts differ from the files: {_summary(batch)}, {len(output)} output and {len(errors)} error lines"
    )
    return output, errors


def _assert_only_accepted_errors(errors: list[dict], context: str = "") -> None:
    bad = [line for line in errors if (line.get("error") or {}).get("code") not in ACCEPTED_ERROR_CODES]
    assert not bad, f"{context}{len(bad)} unexpected error lines, e.g. {bad[:3]}"


def _sluice_calls(commands: dict[str, dict[str, float]]) -> int:
    return sum(int(v["calls"]) for cmd, v in commands.items() if not cmd.startswith(FIXTURE_COMMANDS))


def _working_master(cluster):
    """The master that served the most of Sluice's commands since the last ``reset_stats``: with one batch
    running, the master of its shard (found without naming a key)."""
    calls = {name: _sluice_calls(commands) for name, commands in cluster.commandstats().items()}
    name = max(calls, key=lambda n: calls[n])
    return next(node for node in cluster.masters() if node.name == name), calls


# ----------------------------------------------------------------------------- the README flow


def test_readme_flow_on_the_cluster(cstack, wait_until):
    stack, client = cstack, cstack.client()
    run = uuid.uuid4().hex[:8]
    messages = {f"readme-{run}-{i:02d}": f"hello {i} from {run}" for i in range(30)}
    failing = {cid for i, cid in enumerate(messages) if i % 10 == 3}
    rows = [
        stack.chat_line(cid, msg, **({"mock_status": 400} if cid in failing else {})) for cid, msg in messages.items()
    ]

    data = stack.to_jsonl(rows)
    uploaded = stack.upload_jsonl(data, client=client, filename="readme.jsonl")
    assert uploaded.status == "processed" and uploaded.bytes == len(data), uploaded
    assert client.files.content(uploaded.id).content == data
    created = stack.create_batch(uploaded.id, client=client, metadata={"suite": "cluster"})
    assert created.status == "validating", created

    batch = _wait_terminal(stack, client, created.id, wait_until, timeout=90)
    assert batch.status == "completed", _summary(batch)
    output, errors = _assert_exactly_once(stack, client, batch, set(messages))
    assert {line["custom_id"] for line in errors} == failing, errors
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    for line in errors:
        assert line["response"]["status_code"] == 400, line

    # Cancel a batch while its lines wait at the mock: the held ones drain, the rest are cancelled.
    gate = f"readme-cancel-{run}"
    held = {f"cancel-{run}-{i:03d}": f"cancel {i}" for i in range(200)}
    _, to_cancel = stack.submit([stack.chat_line(c, m, mock_hold=gate) for c, m in held.items()], client=client)
    stack.mock().wait_held(gate, 1)
    resp = client.batches.cancel(to_cancel.id)
    assert resp.status in ("cancelling", "cancelled"), _summary(resp)
    stack.mock().release(gate)
    cancelled = _wait_terminal(stack, client, to_cancel.id, wait_until, timeout=90)
    assert cancelled.status == "cancelled", _summary(cancelled)
    _, cancel_errors = _assert_exactly_once(stack, client, cancelled, set(held))
    assert any(line["error"]["code"] == "batch_cancelled" for line in cancel_errors), _summary(cancelled)

    # List pagination, one object per page, newest first.
    listed = [b.id for b in client.batches.list(limit=1)]
    assert listed.index(to_cancel.id) < listed.index(created.id), listed
    assert len(listed) == len(set(listed)), listed
    file_ids = [f.id for f in client.files.list(limit=2)]
    assert {uploaded.id, batch.output_file_id, batch.error_file_id} <= set(file_ids), file_ids

    # Delete a file: gone from retrieve and from the list.
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert uploaded.id not in {f.id for f in client.files.list()}


# ----------------------------------------------------------------------------- balance over the masters


def _files_per_shard(stack, client) -> dict[int, list[str]]:
    """Input files, ``BATCHES_PER_SHARD`` in every shard (uploading until each has that many)."""
    rows = [stack.chat_line(f"bal-{i:03d}", f"balance {i}", mock_latency_ms=400) for i in range(40)]
    data = stack.to_jsonl(rows)
    chosen: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    spare: list[str] = []
    for _ in range(MAX_UPLOADS):
        if all(len(ids) >= BATCHES_PER_SHARD for ids in chosen.values()):
            break
        file_id = stack.upload_jsonl(data, client=client, filename="balance.jsonl").id
        shard = int(file_id[-1], 16)
        (chosen[shard] if len(chosen[shard]) < BATCHES_PER_SHARD else spare).append(file_id)
    for file_id in spare:
        client.files.delete(file_id)
    short = {s: len(ids) for s, ids in chosen.items() if len(ids) < BATCHES_PER_SHARD}
    assert not short, (
        f"after {MAX_UPLOADS} uploads some shards (last hex digit of the file id) still lack input files: "
        f"{short}; file ids do not spread over the 16 shards of docs/cluster-design.md"
    )
    return chosen


def test_commands_spread_over_the_masters(cstack, wait_until):
    stack, client, cluster = cstack, cstack.client(), cstack.cluster
    files = _files_per_shard(stack, client)

    cluster.reset_stats()
    batches = [stack.create_batch(file_id, client=client).id for ids in files.values() for file_id in ids]
    ended = [_wait_terminal(stack, client, b, wait_until, timeout=180) for b in batches]
    stats = cluster.commandstats()

    not_completed = [_summary(b) for b in ended if b.status != "completed"]
    assert not not_completed, not_completed
    calls = {node: _sluice_calls(commands) for node, commands in stats.items()}
    total = sum(calls.values())
    assert total > 0, f"no command of Sluice's reached the masters: {stats}"
    shares = {node: n / total for node, n in calls.items()}
    top = {
        node: sorted(((cmd, int(v["calls"])) for cmd, v in commands.items()), key=lambda kv: -kv[1])[:6]
        for node, commands in stats.items()
    }
    report = ", ".join(f"{node} {shares[node]:.1%} ({calls[node]:,} calls)" for node in sorted(shares))
    print(f"per-master share of Sluice's commands over {len(batches)} batches: {report}")
    assert len(shares) == 3, stats.keys()
    assert all(0.20 <= s <= 0.45 for s in shares.values()), (
        f"a master outside 20%..45% of Sluice's commands: {report}; top commands per master: {top}"
    )


# ----------------------------------------------------------------------------- chaos


def test_chaos_kills_and_a_failover_keep_exactly_once(cstack, wait_until):
    stack, client, cluster = cstack, cstack.client(timeout=10), cstack.cluster
    seed = int(os.environ.get("SLUICE_CHAOS_SEED", str(int(time.time() * 1000) % 1_000_000)))
    rng = random.Random(seed)
    print(f"cluster chaos seed {seed}")
    run = uuid.uuid4().hex[:8]
    messages = {f"chaos-{run}-{i:05d}": f"line {i} of {run}" for i in range(CHAOS_LINES)}
    faults = {
        cid: {"mock_status": 500, "mock_fail_times": 2} for cid in rng.sample(sorted(messages), CHAOS_LINES // 30)
    }
    faults.update({cid: {"mock_status": 429, "mock_fail_times": 1} for cid in rng.sample(sorted(messages), 4)})
    rows = [stack.chat_line(cid, msg, mock_latency_ms=20, **faults.get(cid, {})) for cid, msg in messages.items()]
    _, batch = stack.submit(rows, client=client)

    stack.kill_and_replace("web")  # while it validates and feeds
    schedule = sorted(rng.uniform(0.05, 0.85) for _ in range(CHAOS_KILLS))
    failover_at = rng.randrange(CHAOS_KILLS)
    for i, fraction in enumerate(schedule):
        target = int(fraction * CHAOS_LINES)
        wait_until(
            lambda target=target: (_progress(client, batch.id) or 0) >= target,
            timeout=90,
            message=f"batch {batch.id} to reach {target} results (seed {seed})",
            check=stack.check_alive,
        )
        if i == failover_at:
            master = rng.choice(cluster.masters())
            cluster.failover(cluster.replica_of(master))
        stack.kill_and_replace(rng.choice(CHAOS_ROLES))

    done = _wait_terminal(stack, client, batch.id, wait_until, what=f"(seed {seed}) ")
    assert done.status == "completed", f"seed {seed}: {_summary(done)}"
    output, errors = _assert_exactly_once(stack, client, done, set(messages), context=f"seed {seed}: ")
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    _assert_only_accepted_errors(errors, f"seed {seed}: ")


# ----------------------------------------------------------------------------- failover mid-batch (last)


def test_batch_survives_a_failover_and_a_killed_master(cstack, wait_until):
    stack, client, cluster = cstack, cstack.client(timeout=10), cstack.cluster
    run = uuid.uuid4().hex[:8]
    # Three phases of 1,000 lines: the second and third wait at gates, so the failover and the kill
    # each land while lines are in flight and results are being recorded.
    gates = (None, f"failover-{run}", f"kill-{run}")
    messages: dict[str, str] = {}
    rows = []
    for phase, gate in enumerate(gates):
        for i in range(1000):
            cid = f"fo-{run}-{phase}-{i:04d}"
            messages[cid] = f"phase {phase} line {i}"
            extra = {"mock_hold": gate} if gate else {}
            rows.append(stack.chat_line(cid, messages[cid], mock_latency_ms=50, **extra))
    cluster.reset_stats()
    _, batch = stack.submit(rows, client=client)
    mock = stack.mock()

    # Each event hits the master doing the batch's work, just after the gate opens, so results are
    # being recorded on it when it goes.
    mock.wait_held(gates[1], 16, timeout=120)
    master, calls = _working_master(cluster)
    replica = cluster.replica_of(master)
    mock.release(gates[1])
    cluster.failover(replica)
    print(f"failover: {replica.name} took over from {master.name} (calls so far {calls})")
    cluster.reset_stats()

    mock.wait_held(gates[2], 16, timeout=120)
    victim, calls = _working_master(cluster)
    mock.release(gates[2])
    killed, promoted = cluster.kill_master(victim)
    print(f"killed master {killed.name} (calls since the failover {calls}); {promoted.name} promoted")

    done = _wait_terminal(stack, client, batch.id, wait_until, timeout=150)
    assert done.status == "completed", _summary(done)
    output, errors = _assert_exactly_once(stack, client, done, set(messages))
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    _assert_only_accepted_errors(errors)
