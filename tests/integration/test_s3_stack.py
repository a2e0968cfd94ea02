"""Whole batches on S3 storage, with every process on a "host" of its own (its own SLUICE_DATA_DIR).

Web, workers and finalizer share only Redis and the object store (moto's server mode on loopback),
as processes on separate hosts (or Heroku dynos) would.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter

import pytest

from service.core import keys
from service.core.storage import S3Storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _local_files(stack) -> list[str]:
    """Files any Sluice process left in its own data dir."""
    return [str(p.relative_to(stack.data_dir)) for p in stack.data_dir.rglob("*") if p.is_file()]


def _assert_exactly_once(stack, batch, messages: dict[str, str]) -> None:
    output, errors = stack.results(batch)
    assert errors == [], errors[:3]
    counts = Counter(line["custom_id"] for line in output)
    assert set(counts) == set(messages), sorted(set(counts) ^ set(messages))[:10]
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + messages[line["custom_id"]]
    assert batch.request_counts.total == batch.request_counts.completed == len(messages)


def test_batch_across_hosts_sharing_only_redis_and_s3(stack_factory, s3_bucket):
    stack = stack_factory.start(name="s3-hosts", separate_data_dirs=True, env=s3_bucket.env)
    dirs = {p.name: p for p in stack.data_dir.iterdir()}
    assert set(dirs) == {"web", "worker-1", "worker-2", "finalizer"}

    run = uuid.uuid4().hex[:8]
    messages = {f"s3-{run}-{i:03d}": f"hello {i}" for i in range(200)}
    client = stack.client()
    rows = [stack.chat_line(cid, msg) for cid, msg in messages.items()]
    uploaded, created = stack.submit(rows, client=client)
    # The input is served back from the object store, byte for byte.
    assert client.files.content(uploaded.id).content == stack.to_jsonl(rows)

    batch = stack.wait_for_batch(created.id, client=client, timeout=90)
    assert batch.status == "completed", batch
    _assert_exactly_once(stack, batch, messages)
    # The output file the finalizer wrote is served by the web process, from S3.
    assert client.files.retrieve(batch.output_file_id).bytes == len(client.files.content(batch.output_file_id).content)

    objects = s3_bucket.keys()
    assert all(k.startswith(f"{s3_bucket.prefix}/") for k in objects), objects
    assert any(".parts/" in k and "_output.jsonl" in k for k in objects), objects
    assert _local_files(stack) == [], "file contents went to a local disk"

    # Deleting the output file removes its objects.
    client.files.delete(batch.output_file_id)
    assert not any("_output.jsonl" in k for k in s3_bucket.keys())


def test_large_upload_streams_through_multipart_and_a_refused_one_leaves_nothing(stack_factory, s3_bucket):
    stack = stack_factory.start(
        name="s3-upload",
        workers=0,
        finalizer=False,
        separate_data_dirs=True,
        env={**s3_bucket.env, "SLUICE_MAX_FILE_BYTES": str(20 * 1024 * 1024)},
    )
    client = stack.client(timeout=120.0)
    block = bytes(range(256)) * 4096  # 1 MiB
    data = block * 17 + b"tail"
    uploaded = client.files.create(file=("big.bin", data), purpose="user_data")
    assert uploaded.bytes == len(data)
    head = s3_bucket.server.client().head_object(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/{uploaded.id}")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3"), head  # 8 + 8 + 1 MiB
    assert client.files.content(uploaded.id).content == data

    before = s3_bucket.keys()
    res = stack.http(
        "POST",
        "/v1/files",
        data=_multipart(block * 21),
        timeout=120,
        headers={"Content-Type": "multipart/form-data; boundary=sluiceboundary"},
    )
    assert res.status == 413, res.body[:300]
    assert s3_bucket.keys() == before
    uploads = s3_bucket.server.client().list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert uploads == [], "the refused upload's multipart upload was not aborted"
    assert _local_files(stack) == []


def _multipart(content: bytes) -> bytes:
    return (
        b'--sluiceboundary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        b'--sluiceboundary\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--sluiceboundary--\r\n"
    )


def _torn_append(s3_bucket, key: str, offset: int) -> None:
    """What a finalizer killed inside an append leaves: bytes stored past the offset Redis recorded."""

    async def go() -> None:
        storage = S3Storage(s3_bucket.name, s3_bucket.prefix, endpoint_url=s3_bucket.server.url)
        try:
            head = b"".join([c async for c in storage.read(key)])[:offset]
            assert len(head) == offset
            duplicate = head.splitlines(keepends=True)[-1]  # a line already in the file, once more
            await storage.append(key, duplicate * 3, offset)
        finally:
            await storage.aclose()

    asyncio.run(go())


@pytest.mark.single_redis
def test_finalizer_killed_mid_drain_on_s3_keeps_exactly_once(stack_factory, s3_bucket, wait_until, monkeypatch):
    for name, value in s3_bucket.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    # 16 requests in flight at 100 ms each: about 160 lines/s. The lines come in three parts, each
    # held at a gate of the mock until the round before it is over, and the very last line until
    # the end: every round has lines left to drain, and the batch cannot finish before the last kill.
    stack = stack_factory.start(
        name="s3-kill",
        separate_data_dirs=True,
        worker_concurrency=8,
        env={**s3_bucket.env, "SLUICE_LEASE_S": "3"},
        mock={"gates": True},
    )
    redis = stack.redis.client()
    run = uuid.uuid4().hex[:8]
    messages = {f"k-{run}-{i:04d}": f"line {i} " + "x" * (i % 50) for i in range(3000)}
    gates = [f"part1-{run}", f"part2-{run}", f"last-{run}"]

    def gate_of(i: int) -> dict:
        if i == len(messages) - 1:
            return {"mock_hold": gates[2]}
        return {"mock_hold": gates[i // 1000 - 1]} if i >= 1000 else {}

    rows = [
        stack.chat_line(cid, msg, mock_latency_ms=100, **gate_of(i)) for i, (cid, msg) in enumerate(messages.items())
    ]
    _, created = stack.submit(rows)
    batch_key = keys.batch(created.id)
    rng = random.Random(run)

    def drained() -> int:
        return int(redis.hget(batch_key, "fin_out_lines") or 0)

    seen = 0
    for round_ in range(3):
        # Each finalizer dies soon after it has appended something: while it drains more.
        wait_until(
            lambda seen=seen: drained() > seen,
            timeout=60,
            interval=0.01,
            check=stack.check_alive,
            message=f"a finalizer to drain past {seen} lines",
        )
        time.sleep(rng.uniform(0, 0.15))
        finalizer = next(p for p in stack.processes if p.name.startswith("finalizer") and p.alive)
        finalizer.stopping = True
        finalizer.signal(signal.SIGKILL)
        finalizer.popen.wait(timeout=10)
        seen = drained()
        assert redis.hget(batch_key, "status") == b"in_progress", "the batch finished before the kill"
        assert seen < len(messages)
        # Whether or not this kill hit an append, make it look as if it had: the next one must redo it.
        _torn_append(s3_bucket, f"{created.id}_output.jsonl", int(redis.hget(batch_key, "fin_out_bytes")))
        stack.spawn("finalizer")
        stack.mock().release(gates[round_])  # the next part (after the last round: the last line)

    batch = stack.wait_for_batch(created.id, timeout=120)
    assert batch.status == "completed", batch
    _assert_exactly_once(stack, batch, messages)
    assert _local_files(stack) == []
    redis.close()
