"""Chaos, pauses: SIGSTOP a process past its lease while it works, SIGCONT it after a peer took over.

A paused process (a GC pause, a frozen VM, a stalled disk) resumes with everything it had read
before: offsets, positions, lines in flight. Whatever it then tries must change nothing it no
longer owns (``service/core/leases.py``): every batch still ends, every custom_id comes back
exactly once, and the output and error files hold no NUL bytes. Each role is paused at a moment
it is working, told by observable state (the batch's drain offsets, its feed position, XPENDING),
never at a guessed time. Part of the chaos suite (``-m chaos``), with ``test_chaos.py``.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
from conftest import ManagedProcess, Stack, _sluice_cmd, free_port, http_request
from redis.exceptions import ResponseError

from service.core import keys, leases

pytestmark = [pytest.mark.integration, pytest.mark.single_redis, pytest.mark.chaos, pytest.mark.timeout(300)]

LEASE_ENV = {"SLUICE_LEASE_S": "2"}  # every lease (finalizer, feeder, validator) lasts 2 s


def _pid(holder: str) -> int | None:
    """The pid inside a process name (``host-pid-hex``, see ``lifecycle.process_name``)."""
    return int(holder.split("-")[-2]) if holder else None


def _by_pid(stack: Stack, pid: int | None) -> ManagedProcess | None:
    return next((p for p in stack.processes if p.pid == pid and p.alive), None)


def _holder(redis, lease_key: str) -> str:
    return leases.holder_of(redis.get(lease_key))


@contextmanager
def _paused(proc: ManagedProcess) -> Iterator[None]:
    """SIGSTOP ``proc`` for the block; SIGCONT it afterwards, whatever happens in the block."""
    proc.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.signal(signal.SIGCONT)


def _events(proc: ManagedProcess) -> list[dict]:
    records = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def _fenced(proc: ManagedProcess) -> list[str]:
    """The fencing events a resumed process logged: it noticed it had lost its lease."""
    return [r["event"] for r in _events(proc) if r["event"] in ("lease_lost", "fenced_write_refused")]


def _check_exactly_once(client, batch, messages: dict[str, str]) -> None:
    """Every custom_id once across both files, each answered with its own message; no NUL bytes."""
    assert batch.status == "completed", batch
    seen: Counter[str] = Counter()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        raw = client.files.content(file_id).content
        assert b"\x00" not in raw, f"{raw.count(bytes(1))} NUL bytes in {file_id}"
        assert client.files.retrieve(file_id).bytes == len(raw)
        for line in raw.decode().splitlines():
            record = json.loads(line)
            seen[record["custom_id"]] += 1
            assert (
                record["response"]["body"]["choices"][0]["message"]["content"]
                == "echo: " + messages[record["custom_id"]]
            ), record
    missing = set(messages) - set(seen)
    assert not missing, f"{len(missing)} custom_ids missing, e.g. {sorted(missing)[:3]}"
    twice = {cid: n for cid, n in seen.items() if n != 1}
    assert not twice, f"{len(twice)} custom_ids more than once, e.g. {list(twice.items())[:3]}"
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(messages), len(messages), 0), counts


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_finalizers_paused_while_draining_change_nothing_they_lost(stack_factory, wait_until, request, storage):
    """Two finalizers and a 20,000-line batch: each in turn is paused in the middle of its drain loop,
    and resumed once the other has taken the batch over (on local files, and on S3)."""
    env = dict(LEASE_ENV)
    if storage == "s3":
        env.update(request.getfixturevalue("s3_bucket").env)
    stack = stack_factory.start(name=f"pause-finalizer-{storage}", workers=2, worker_concurrency=32, env=env)
    finalizers = [stack.process("finalizer"), stack.spawn("finalizer")]
    client = stack.client(timeout=120)
    run = uuid.uuid4().hex[:8]
    # Long results: a drain step appends a few megabytes, so draining the whole batch takes a good
    # while longer than the test needs to notice a step and stop the process that made it.
    messages = {f"pf-{run}-{i:05d}": f"line {i} " + "x" * 1200 for i in range(20_000)}
    redis = stack.redis.client()
    batch_id = ""
    with _paused(finalizers[0]), _paused(finalizers[1]):
        # Every result is recorded before any finalizer runs: then whoever holds the batch drains
        # one step after another without a pause, and a SIGSTOP right after a step lands mid-drain.
        _, created = stack.submit([stack.chat_line(cid, msg) for cid, msg in messages.items()], client=client)
        batch_id = created.id
        wait_until(
            lambda: int(redis.hget(keys.batch(batch_id), "completed") or 0) == len(messages),
            timeout=180,
            check=stack.check_alive,
            message="the workers to answer every line",
        )
    batch_key, lease_key = keys.batch(batch_id), keys.finalizer(batch_id)

    def drained() -> int:
        return int(redis.hget(batch_key, "fin_out_lines") or 0)

    def holder() -> ManagedProcess | None:
        return _by_pid(stack, _pid(_holder(redis, lease_key)))

    def stepped(past: int, not_by: int | None = None):
        """The holder, once it holds the batch and has recorded a drain step beyond ``past`` (or
        there is nothing left to drain: then it is finishing the batch)."""

        def check() -> ManagedProcess | None:
            now = holder()
            if now is None or now.pid == not_by or not (drained() > past or drained() == len(messages)):
                return None
            return now

        return check

    first = wait_until(
        stepped(0),
        timeout=60,
        interval=0.001,
        check=stack.check_alive,
        message="a finalizer to record its first drain step",
    )
    first.signal(signal.SIGSTOP)
    try:
        # Past the lease: the other finalizer takes the batch and drains on from what Redis says...
        second = wait_until(
            stepped(drained(), not_by=first.pid),
            timeout=60,
            interval=0.001,
            check=stack.check_alive,
            message="the other finalizer to take the batch over",
        )
        # ... and is paused in turn, right after a drain step of its own, before the first resumes.
        second.signal(signal.SIGSTOP)
    finally:
        first.signal(signal.SIGCONT)
    with _paused(second):
        wait_until(
            lambda: (
                (now := holder()) is not None
                and now.pid == first.pid
                or redis.hget(batch_key, "status") == b"completed"
            ),
            timeout=60,
            interval=0.001,
            check=stack.check_alive,
            message="the resumed finalizer to take the batch back",
        )

    batch = stack.wait_for_batch(batch_id, client=client, timeout=180)
    _check_exactly_once(client, batch, messages)
    finished = [r for p in finalizers for r in _events(p) if r["event"] == "batch_finished"]
    assert len(finished) == 1, finished
    for paused in (first, second):
        # Resumed in the middle of a drain step: the step's write to Redis was refused.
        assert "fenced_write_refused" in _fenced(paused), paused.tail()
    redis.close()


def test_worker_paused_with_lines_in_flight(stack_factory, wait_until):
    """A worker paused past its lease with requests in flight; a peer reclaims and answers them."""
    stack = stack_factory.start(
        name="pause-worker", workers=2, worker_concurrency=8, mock_latency_ms=1500, env=LEASE_ENV
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    messages = {f"pw-{run}-{i:03d}": f"line {i}" for i in range(120)}
    _, created = stack.submit([stack.chat_line(cid, msg) for cid, msg in messages.items()], client=client)
    redis = stack.redis.client()
    stream = keys.lines(created.id)
    victim = stack.process("worker-1")

    def in_flight(proc: ManagedProcess) -> int:
        summary = redis.xpending(stream, keys.WORKER_GROUP)
        return sum(c["pending"] for c in summary["consumers"] if _pid(c["name"].decode()) == proc.pid)

    # (The stream and its group appear once the batch is validated.)
    wait_until(
        lambda: in_flight(victim) > 0,
        timeout=30,
        ignore=(ResponseError,),
        check=stack.check_alive,
        message="worker-1 to have lines in flight",
    )
    with _paused(victim):
        held = in_flight(victim)
        # Past the lease: the other worker reclaims every line the paused one held.
        wait_until(
            lambda: in_flight(victim) == 0,
            timeout=60,
            check=stack.check_alive,
            message=f"the other worker to reclaim the {held} lines of the paused one",
        )

    batch = stack.wait_for_batch(created.id, client=client, timeout=120)
    _check_exactly_once(client, batch, messages)
    assert "lines_reclaimed" in stack.process("worker-2").tail(500)
    redis.close()


def test_web_paused_while_feeding(stack_factory, wait_until):
    """Two web processes; the one feeding a batch (a window of 2,000 of its 8,000 lines) is paused in
    the middle of topping the window up, and resumed once the other has taken the feeding over."""
    window, chunk = 2000, 500  # feeder.CHUNK lines per script call: a top-up of >= 1,000 takes several
    stack = stack_factory.start(
        name="pause-web", workers=2, worker_concurrency=32, env={**LEASE_ENV, "SLUICE_WINDOW_LINES": str(window)}
    )
    other_port = free_port()
    stack.runner.start("web-b", _sluice_cmd("web"), env={**stack.env, "PORT": str(other_port)})
    wait_until(
        lambda: http_request("GET", f"http://127.0.0.1:{other_port}/healthz", timeout=2).status == 200,
        timeout=30,
        ignore=(OSError,),
        check=stack.check_alive,
        message="the second web process to start",
    )
    clients = {
        stack.port: stack.client(timeout=60),
        other_port: stack.client(base_url=f"http://127.0.0.1:{other_port}/v1", timeout=60),
    }
    run = uuid.uuid4().hex[:8]
    # Long lines: reading and checking the next chunk of a top-up takes the feeder a while.
    messages = {f"pweb-{run}-{i:04d}": f"line {i} " + "y" * 1500 for i in range(8000)}
    _, created = stack.submit([stack.chat_line(cid, msg) for cid, msg in messages.items()], client=clients[stack.port])
    redis = stack.redis.client()
    batch_key, lease_key = keys.batch(created.id), keys.feeder(created.id)

    def fed() -> int:
        return int(redis.hget(batch_key, "feed_index") or 0)

    seen = [0]

    def topping_up() -> ManagedProcess | None:
        # One chunk just published, with room left in the window: the feeder is reading the next.
        index, done, failed = (int(v or 0) for v in redis.hmget(batch_key, "feed_index", "completed", "failed"))
        last, seen[0] = seen[0], index
        mid_batch = window <= index <= len(messages) - window
        if index - last != chunk or not mid_batch or index - done - failed > window - chunk:
            return None
        return _by_pid(stack, _pid(_holder(redis, lease_key)))

    feeder = wait_until(
        topping_up,
        timeout=60,
        interval=0.001,
        check=stack.check_alive,
        message="a web process to be topping the batch's window up",
    )
    with _paused(feeder):
        at_pause = fed()
        wait_until(
            lambda: _pid(_holder(redis, lease_key)) not in (None, feeder.pid) and fed() > at_pause,
            timeout=60,
            check=stack.check_alive,
            message="the other web process to take the feeding over",
        )

    # Asked of the web process that was never paused.
    client = clients[other_port if feeder.name == "web" else stack.port]
    batch = stack.wait_for_batch(created.id, client=client, timeout=120)
    _check_exactly_once(client, batch, messages)
    assert fed() == len(messages)
    # It noticed, once resumed, that the batch was no longer its own: a lease renewal failed, or
    # (when the pause fell inside a top-up, as it mostly does) the next chunk's publication was refused.
    assert _fenced(feeder), feeder.tail()
    redis.close()


def test_three_finalizers_finish_batches_concurrently(stack_factory, wait_until):
    """N finalizers share the running batches: each finishes some, each batch is finished once."""
    stack = stack_factory.start(
        name="three-finalizers", workers=2, worker_concurrency=32, mock_latency_ms=500, env=LEASE_ENV
    )
    finalizers = [stack.process("finalizer"), stack.spawn("finalizer"), stack.spawn("finalizer")]
    redis = stack.redis.client()
    wait_until(
        lambda: redis.zcard(keys.FINALIZERS) == 3,
        timeout=30,
        check=stack.check_alive,
        message="the three finalizers to check in",
    )
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    batches = {}
    for b in range(6):
        messages = {f"f3-{run}-{b}-{i:03d}": f"batch {b} line {i}" for i in range(150)}
        _, created = stack.submit([stack.chat_line(cid, msg) for cid, msg in messages.items()], client=client)
        batches[created.id] = messages

    def holders() -> set[int | None]:
        return {_pid(leases.holder_of(v)) for v in redis.mget([keys.finalizer(b) for b in batches])} - {None}

    # At once: while the batches run, every finalizer holds some of them.
    wait_until(
        lambda: holders() == {p.pid for p in finalizers},
        timeout=60,
        check=stack.check_alive,
        message=lambda: f"each finalizer to hold running batches (holders {holders()})",
    )
    for batch_id, messages in batches.items():
        _check_exactly_once(client, stack.wait_for_batch(batch_id, client=client, timeout=120), messages)
    finished = {p.pid: [r["batch_id"] for r in _events(p) if r["event"] == "batch_finished"] for p in finalizers}
    assert sorted(b for ids in finished.values() for b in ids) == sorted(batches), finished
    assert all(finished.values()), finished
    redis.close()


def test_a_lone_finalizer_paused_past_its_lease_takes_its_batch_back(stack_factory, wait_until):
    """Paused mid-drain with no peer: its lease expires, and once resumed it takes it anew and finishes."""
    stack = stack_factory.start(name="pause-alone", workers=2, worker_concurrency=16, mock_latency_ms=20, env=LEASE_ENV)
    finalizer = stack.process("finalizer")
    client = stack.client()
    run = uuid.uuid4().hex[:8]
    messages = {f"pa-{run}-{i:04d}": f"line {i}" for i in range(5000)}
    _, created = stack.submit([stack.chat_line(cid, msg) for cid, msg in messages.items()], client=client)
    redis = stack.redis.client()
    lease_key = keys.finalizer(created.id)
    wait_until(
        lambda: 0 < int(redis.hget(keys.batch(created.id), "fin_out_lines") or 0) < 3000,
        timeout=60,
        interval=0.002,
        check=stack.check_alive,
        message="the finalizer to be draining the batch",
    )
    first = redis.get(lease_key)
    with _paused(finalizer):
        wait_until(
            lambda: redis.get(lease_key) is None,
            timeout=30,
            check=stack.check_alive,
            message="the paused finalizer's lease to expire",
        )
    _check_exactly_once(client, stack.wait_for_batch(created.id, client=client, timeout=120), messages)
    assert _fenced(finalizer), finalizer.tail()
    taken = [r["token"] for r in _events(finalizer) if r["event"] == "batch_leased"]
    # Taken again after the pause, under a new (larger) fencing token.
    assert len(taken) == 2 and leases.Lease.parse(lease_key, first).token == taken[0] < taken[1], taken
    redis.close()
