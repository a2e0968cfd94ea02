"""What exact counting costs on the hot path: ``python -m bench.record_cost [--lines N] [--per-call K]``.

Records N lines of one batch, K per script call (a worker's group commit), on a private
``redis-server``, twice: with the recording script as it was before exact counting (the line
counters then lived in process memory and reached Redis with heartbeats, a dict increment per
line) and with ``store.record_many`` as it is, each line carrying its upstream attempts. Prints
Redis's CPU (INFO cpu, main thread) and the client's CPU (building arguments, redis-py, the
reply) per 1,000 lines, the best of ``--repeat`` runs of each.

Lines look like a real run's: one attempt answered 200 for most, a retried 500 for 3 %, a 429
for 0.3 %, latencies spread over a few histogram buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from bisect import bisect_left
from typing import cast

import redis.asyncio as aioredis

from bench.local_redis import private_redis
from service.core import keys, store, streams
from service.core.connections import Pipeline, Redis, Script
from service.core.counters import LATENCY_BUCKETS, Attempts

# The recording script before exact counting (commit 961d74e), for comparison only: its body is
# kept as it was then, reading its slots by index.
_RECORD_BEFORE = Script(
    keys=("done", "results", "batch", "lines"),
    args=("group", "*records"),
    source="""
local recorded = 0
local alive = redis.call('EXISTS', KEYS[2]) == 1
for i = 2, #ARGV, 4 do
  local entry = ARGV[i + 1]
  if entry ~= '' then
    redis.call('XACK', KEYS[4], ARGV[1], entry)
    redis.call('XDEL', KEYS[4], entry)
  end
  if alive and redis.call('SETBIT', KEYS[1], ARGV[i], 1) == 0 then
    redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', 'r', ARGV[i + 3], 'o', ARGV[i + 2])
    redis.call('HINCRBY', KEYS[3], ARGV[i + 2], 1)
    recorded = recorded + 1
  end
end
return recorded
""",
)

RESULT = (
    b'{"id":"batch_req_x","custom_id":"c","response":{"status_code":200,"request_id":"req_1","body":'
    b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"echo: hello there, this is a line of about the usual size"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":12,"total_tokens":24}}},"error":null}'
)


def _tries(rng: random.Random) -> list[tuple[str, float, bool]]:
    """One line's attempts: (status, seconds, paused the provider)."""
    roll = rng.random()
    first = (
        [("500", rng.uniform(0.005, 0.05), False)]
        if roll < 0.03
        else [("429", rng.uniform(0.005, 0.05), True)]
        if roll < 0.033
        else []
    )
    return [*first, ("200", rng.uniform(0.01, 0.6), False)]


class _OldTally:
    """What a worker did per line and attempt before exact counting (heartbeat.Tally, in memory)."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.latency: dict[tuple[str, str], list] = {}
        self.upstream: dict[str, int] = {}

    def request(self, provider: str, status: str, seconds: float) -> None:
        h = self.latency.get((provider, status))
        if h is None:
            h = self.latency[(provider, status)] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
        i = bisect_left(LATENCY_BUCKETS, seconds)
        if i < len(LATENCY_BUCKETS):
            h[0][i] += 1
        h[1] += seconds
        h[2] += 1

    def count(self, what: str, provider: str) -> None:
        field = f"{what}|{provider}"
        self.upstream[field] = self.upstream.get(field, 0) + 1

    def line(self, outcome: str) -> None:
        self.lines[outcome] = self.lines.get(outcome, 0) + 1


async def _prepare(r: aioredis.Redis, batch_id: str, lines: int) -> list[str]:
    """A running batch with ``lines`` entries read by the worker group (pending, as in a real run)."""
    await r.xgroup_create(keys.lines(batch_id), keys.WORKER_GROUP, id="0", mkstream=True)
    await r.xadd(keys.results(batch_id), {streams.RESULT_LINE: "{}", streams.RESULT_OUTCOME: "completed"})
    await r.hset(keys.batch(batch_id), mapping={"completed": 0, "failed": 0, "total": lines})
    for start in range(0, lines, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(lines, start + 1000)):
            pipe.xadd(
                keys.lines(batch_id),
                {
                    streams.LINE_CUSTOM_ID: f"c{i}",
                    streams.LINE_BODY: "{}",
                    streams.LINE_PROVIDER: "default",
                    streams.LINE_COST: 1,
                },
                id=f"0-{i + 1}",
            )
        await pipe.execute()
    await r.xreadgroup(keys.WORKER_GROUP, "bench", {keys.lines(batch_id): ">"}, count=lines)
    return [f"0-{i + 1}" for i in range(lines)]


async def _redis_cpu(r: aioredis.Redis) -> float:
    info = await r.info("cpu")
    return float(info.get("used_cpu_sys_main_thread", info["used_cpu_sys"])) + float(
        info.get("used_cpu_user_main_thread", info["used_cpu_user"])
    )


async def _run(r: aioredis.Redis, mode: str, lines: int, per_call: int, seed: int) -> tuple[float, float]:
    batch_id = f"batch_bench{mode}{seed}"
    entries = await _prepare(r, batch_id, lines)
    rng = random.Random(seed)
    tries = [_tries(rng) for _ in range(lines)]
    tally = _OldTally()
    redis_before, client_before = await _redis_cpu(r), time.process_time()
    for start in range(0, lines, per_call):
        chunk = range(start, min(lines, start + per_call))
        if mode == "before":
            argv: list = []
            for i in chunk:
                for status, seconds, paused in tries[i]:
                    tally.request("default", status, seconds)
                    if status == "429":
                        tally.count("rate_limited", "default")
                    if paused:
                        tally.count("pauses", "default")
                if len(tries[i]) > 1:
                    tally.count("retries", "default")
                argv += [i, entries[i], "completed", RESULT]
            pipe = r.pipeline(transaction=False)
            _RECORD_BEFORE.queue(
                cast(Pipeline, pipe),
                done=keys.done(batch_id),
                results=keys.results(batch_id),
                batch=keys.batch(batch_id),
                lines=keys.lines(batch_id),
                group=keys.WORKER_GROUP,
                records=argv,
            )
            await pipe.execute()
            for _ in chunk:
                tally.line("completed")
        else:
            results: list[store.Result] = []
            for i in chunk:
                attempts = Attempts("default")
                for status, seconds, paused in tries[i]:
                    attempts.add(status, seconds)
                    if paused:
                        attempts.paused()
                results.append((i, entries[i], "completed", RESULT, *attempts.encode("completed")))
            await store.record_many(cast(Redis, r), {batch_id: results})
    redis_cpu, client_cpu = await _redis_cpu(r) - redis_before, time.process_time() - client_before
    await r.delete(*keys.work_keys(batch_id))
    return redis_cpu * 1000 / lines, client_cpu * 1000 / lines


async def _main(args: argparse.Namespace, port: int) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        for script in (_RECORD_BEFORE, store._RECORD):
            await script.load(cast(Redis, r))
        best: dict[str, tuple[float, float]] = {}
        for rep in range(args.repeat):
            for mode in ("before", "now"):
                got = await _run(r, mode, args.lines, args.per_call, rep)
                old = best.get(mode)
                best[mode] = got if old is None else (min(old[0], got[0]), min(old[1], got[1]))
        print(f"{args.lines:,} lines, {args.per_call} per call; CPU ms per 1,000 lines (best of {args.repeat})")
        print(f"{'':28}{'redis-server':>14}{'client':>10}{'total':>10}")
        for mode, label in (("before", "before (memory tally)"), ("now", "now (exact, in the script)")):
            redis_ms, client_ms = (x * 1000 for x in best[mode])
            print(f"{label:28}{redis_ms:14.2f}{client_ms:10.2f}{redis_ms + client_ms:10.2f}")
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    """Start a private redis-server, measure, stop it."""
    parser = argparse.ArgumentParser(prog="python -m bench.record_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--per-call", type=int, default=32, help="lines per script call (default 32)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        with private_redis("sluice-record-cost-") as port:
            asyncio.run(_main(args, port))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
