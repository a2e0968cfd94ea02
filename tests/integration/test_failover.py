"""Poison lines, finalizers sharing batches and taking over, and a web process draining uploads on SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
import uuid

import pytest

from service.core import keys, leases

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _kill(proc) -> None:
    proc.stopping = True
    proc.signal(signal.SIGKILL)
    proc.popen.wait(timeout=10)


def test_a_line_that_keeps_killing_workers_ends_as_poison(stack_factory, wait_until):
    stack = stack_factory.start(
        name="poison",
        workers=1,
        worker_concurrency=4,
        env={"SLUICE_LEASE_S": "1", "SLUICE_MAX_DELIVERIES": "2"},
    )
    cid = f"poison-{uuid.uuid4().hex[:8]}"
    # The provider never answers this line in time: every worker holding it is killed.
    _, batch = stack.submit([stack.chat_line(cid, "never answered", mock_latency_ms=60_000)])
    for delivery in (1, 2):
        wait_until(
            lambda delivery=delivery: stack.mock_stats()["requests"] >= delivery,
            timeout=30,
            message=f"delivery {delivery} of the poison line to reach the provider",
            check=stack.check_alive,
        )
        _kill(next(p for p in stack.processes if p.name.startswith("worker") and not p.stopping))
        stack.spawn("worker")

    done = stack.wait_for_batch(batch.id, timeout=30)
    assert done.status == "completed", done
    _, errors = stack.results(done)
    assert [(line["custom_id"], line["response"], line["error"]["code"]) for line in errors] == [
        (cid, None, "poison_line")
    ]
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 1)
    assert stack.mock_stats()["requests"] == 2


@pytest.mark.single_redis
def test_finalizers_share_the_batches_and_take_over_from_a_dead_one(stack_factory, wait_until):
    stack = stack_factory.start(name="finalizers", workers=1, worker_concurrency=2, env={"SLUICE_LEASE_S": "2"})
    first = stack.process("finalizer")
    second = stack.spawn("finalizer")
    messages = {f"fo-{b}-{i}": f"batch {b} line {i}" for b in range(2) for i in range(20)}
    batches = []
    for b in range(2):
        # Slow lines: both batches run long enough for the finalizers to share them out.
        rows = [
            stack.chat_line(cid, msg, mock_latency_ms=1000)
            for cid, msg in messages.items()
            if cid.startswith(f"fo-{b}-")
        ]
        batches.append(stack.submit(rows)[1])
    redis = stack.redis.client()
    lease_keys = [keys.finalizer(b.id) for b in batches]

    def holders() -> list[str]:
        return [leases.holder_of(v) for v in redis.mget(lease_keys)]

    def pid(holder: str) -> int | None:
        return int(holder.split("-")[-2]) if holder else None

    # Every finalizer works: with two of them, each holds one of the two running batches.
    wait_until(
        lambda: sorted(pid(h) or 0 for h in holders()) == sorted([first.pid, second.pid]),
        timeout=30,
        message=lambda: f"each finalizer to hold one batch (holders {holders()})",
        check=stack.check_alive,
    )

    orphan = batches[[pid(h) for h in holders()].index(first.pid)].id
    _kill(first)
    seen = []
    for created in batches:
        done = stack.wait_for_batch(created.id, timeout=60)
        assert done.status == "completed", done
        output, errors = stack.results(done)
        assert errors == []
        seen += [line["custom_id"] for line in output]
    assert sorted(seen) == sorted(messages)
    # The dead finalizer's batch was finished by the live one, once its lease had expired.
    finished = [json.loads(line) for line in second.tail(200).splitlines() if '"batch_finished"' in line]
    assert orphan in [record["batch_id"] for record in finished], finished
    redis.close()


def test_sigterm_lets_an_upload_under_way_finish(stack_factory, wait_until):
    stack = stack_factory.start(name="drain-upload", workers=1)
    boundary = "sluiceboundary"
    # Enough content that the server is streaming the file part into storage when the pause comes.
    first = stack.to_jsonl([stack.chat_line(f"slow-{i}", "hello") for i in range(2000)])
    rest = stack.to_jsonl([stack.chat_line(f"slow-{i}", "hello") for i in range(2000, 2100)])
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    sent_head = threading.Event()
    signalled = threading.Event()
    result: dict = {}

    def body():
        yield head + first
        sent_head.set()
        # The end of the body arrives after the web process was told to stop (an event, not a timer).
        signalled.wait(60)
        yield rest + tail

    def upload():
        request = urllib.request.Request(
            f"{stack.api_url}/files",
            data=body(),
            method="POST",
            headers={
                "Authorization": f"Bearer {stack.token}",
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Transfer-Encoding": "chunked",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            result["status"] = response.status
            result["body"] = response.read()

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert sent_head.wait(10)
    # The upload is under way once its content started streaming into storage.
    wait_until(
        lambda: any((stack.data_dir / "tmp").glob("file-*")),
        timeout=10,
        message="the upload to start streaming into storage",
    )
    web = stack.process("web")
    web.stopping = True
    web.signal(signal.SIGTERM)
    signalled.set()
    uploader.join(60)
    assert result.get("status") == 200, result
    assert json.loads(result["body"])["bytes"] == len(first) + len(rest)
    wait_until(lambda: not web.alive, timeout=30, message="web to exit after draining")
    assert web.returncode == 0
