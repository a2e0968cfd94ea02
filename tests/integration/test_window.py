"""Redis holds a bounded window of a running batch's lines, fed from storage, resumably."""

from __future__ import annotations

import signal
import threading
import uuid
from collections import Counter

import pytest

from service.core import keys

pytestmark = [pytest.mark.integration, pytest.mark.single_redis, pytest.mark.timeout(180)]

WINDOW = 100


class StreamWatcher:
    """Samples the length of a batch's lines stream in a thread until stopped."""

    def __init__(self, stack, batch_id: str) -> None:
        self.client = stack.redis.client()
        self.key = keys.lines(batch_id)
        self.lengths: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.lengths.append(self.client.xlen(self.key))

    def stop(self) -> list[int]:
        self.done.set()
        self.thread.join()
        return self.lengths


def _feed_index(stack, batch_id: str) -> int:
    return int(stack.redis.client().hget(keys.batch(batch_id), "feed_index") or 0)


def _run_watched(stack, rows: list[dict]) -> tuple[object, list[int]]:
    """Submit ``rows``, wait for the batch to end; return it and the sampled stream lengths."""
    _, created = stack.submit(rows)
    watcher = StreamWatcher(stack, created.id)
    try:
        batch = stack.wait_for_batch(created.id, timeout=120)
    finally:
        lengths = watcher.stop()
    _assert_every_line_once(stack, batch, [r["custom_id"] for r in rows])
    assert lengths, "no sample of the stream was taken"
    return batch, lengths


def _assert_every_line_once(stack, batch, custom_ids: list[str]) -> None:
    assert batch.status == "completed", batch
    output, errors = stack.results(batch)
    assert errors == [], errors[:3]
    counts = Counter(line["custom_id"] for line in output)
    assert set(counts) == set(custom_ids), set(counts) ^ set(custom_ids)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}


def test_stream_never_holds_more_than_the_window(stack_factory, wait_until):
    stack = stack_factory.start(
        name="window", workers=2, worker_concurrency=8, mock_latency_ms=20, env={"SLUICE_WINDOW_LINES": str(WINDOW)}
    )
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"w-{run}-{i:04d}", f"window {i}") for i in range(2000)]
    _, lengths = _run_watched(stack, rows)
    assert stack.mock_stats()["requests"] == 2000
    assert max(lengths) <= WINDOW, max(lengths)
    # The stream was refilled many times, not filled once.
    assert sum(1 for a, b in zip(lengths, lengths[1:]) if b > a) >= 10, lengths[:50]


def test_byte_bound_shrinks_the_window_for_big_lines(stack_factory):
    # 64 KiB of window with ~2 KB lines: about 32 lines, raised to the floor of 64.
    stack = stack_factory.start(
        name="window-bytes",
        workers=1,
        worker_concurrency=4,
        mock_latency_ms=20,
        env={"SLUICE_WINDOW_BYTES": str(64 * 1024)},
    )
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"wb-{run}-{i:03d}", f"{i} " + "x" * 2000) for i in range(300)]
    _, lengths = _run_watched(stack, rows)
    assert max(lengths) <= 64, max(lengths)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_feeding_resumes_after_the_web_process_stops(stack_factory, wait_until, sig):
    stack = stack_factory.start(
        name=f"refeed-{sig.name.lower()}",
        workers=2,
        worker_concurrency=8,
        mock={"latency_ms": 20, "gates": True},
        env={"SLUICE_WINDOW_LINES": str(WINDOW)},
    )
    run = uuid.uuid4().hex[:8]
    # From line 350 on, lines wait at the gate: once they fill the workers' slots, feeding stops about
    # a window further, so the web process certainly stops mid-batch.
    gate = f"rf-{run}"
    rows = [
        stack.chat_line(f"rf-{run}-{i:04d}", f"refeed {i}", **({"mock_hold": gate} if i >= 350 else {}))
        for i in range(1500)
    ]
    _, created = stack.submit(rows)
    wait_until(
        lambda: _feed_index(stack, created.id) >= 3 * WINDOW,
        timeout=60,
        check=stack.check_alive,
        message="the feeder to be a few windows in",
    )

    web = stack.process("web")
    web.stopping = True
    web.signal(sig)
    wait_until(lambda: not web.alive, timeout=30, message="the web process to exit")
    stopped_at = _feed_index(stack, created.id)
    assert stopped_at < 1500, "the batch was fully fed before the web process stopped"
    stack.spawn("web", name="web-2")
    stack.wait_healthy()
    stack.mock().release(gate)

    # A SIGKILLed feeder's lease must expire (10 s) before the new process takes over.
    batch = stack.wait_for_batch(created.id, timeout=90)
    _assert_every_line_once(stack, batch, [r["custom_id"] for r in rows])
    assert stack.mock_stats()["requests"] == 1500
