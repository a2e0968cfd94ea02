"""Adaptive concurrency against a provider whose limit Sluice is not told: ``python -m bench.aimd``.

For each hidden limit N (default 8 and 32) it starts a fresh stack on loopback (its own
``redis-server``, a ``sluice mock-provider --max-concurrency N --no-retry-after`` that answers 429,
without ``Retry-After``, to any request beyond N in flight, ``sluice web``, 2 x ``sluice worker``
with 64 slots each and ``sluice finalizer``), with no limit configured for the provider, submits one
batch through the public API and prints:

- the share of upstream requests that ended in 429 (target: at most 5%);
- the throughput, from the mock's first to its last accepted request, against the ideal
  N / latency (target: at least 0.85);
- the adaptive window while the batch ran (sampled from Redis): mean, min and max after the
  first 20% of the run, against N.

It prints numbers; it asserts nothing (the test suite checks bounded properties:
tests/integration/test_adaptive.py). Exit status 1 only when a run broke (a batch that did not
complete, a process that died).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from service.core import keys
from tests.support.mocks import MockSpec
from tests.support.stack import StackFactory

from .runs import TOKEN, Api, poll_until_done, verify_output
from .scenarios import BenchError, write_batch_file

WORKERS = 2
WORKER_CONCURRENCY = 64
WINDOW_KEY = keys.provider_window("default")
SAMPLE_S = 0.1


async def run_one(
    limit: int, latency_ms: float, seconds: float, workdir: Path, adaptive: bool = True
) -> dict[str, Any]:
    """One stack against a mock allowing ``limit`` in flight; a batch sized to run about ``seconds``."""
    ideal = limit / (latency_ms / 1000)
    lines = int(ideal * seconds)
    input_path = workdir / "input.jsonl"
    write_batch_file(input_path, lines, None)
    factory = StackFactory(workdir)
    try:
        stack = factory.start(
            name="aimd",
            redis="single",  # it reads its Redis directly
            workers=WORKERS,
            worker_concurrency=WORKER_CONCURRENCY,
            tokens=(TOKEN,),
            mock=MockSpec(latency_ms=latency_ms, max_concurrency=limit, retry_after=False),
            upstream_suffix="/v1",
            env={
                "SLUICE_LOG_LEVEL": "warning",
                "SLUICE_SHUTDOWN_GRACE_S": "5",
                "SLUICE_ADAPTIVE_CONCURRENCY": "on" if adaptive else "off",
            },
        )
        stack.wait_ready()
        procs = stack.runner
        mock_url, web_url = stack.mock_url, stack.base_url
        redis = aioredis.Redis(host="127.0.0.1", port=stack.redis.port)
        windows: list[tuple[float, float]] = []

        async def sample() -> None:
            while True:
                w = await redis.hget(WINDOW_KEY, "w")
                if w is not None:
                    windows.append((time.monotonic(), float(w)))
                await asyncio.sleep(SAMPLE_S)

        try:
            async with aiohttp.ClientSession() as session:
                api = Api(session, web_url, procs)
                await session.post(f"{mock_url}/_mock/reset")
                uploaded = await api.upload(input_path)
                sampler = asyncio.create_task(sample())
                t0 = time.monotonic()
                batch = await api.create_batch(uploaded["id"])
                _, batch = await poll_until_done(api, batch, t0, procs)
                elapsed = time.monotonic() - t0
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                await verify_output(api, batch, lines)
                async with session.get(f"{mock_url}/_mock/stats") as resp:
                    stats = await resp.json()
        finally:
            await redis.aclose()
    finally:
        factory.close()
    span = (stats["last_request_at"] or 0) - (stats["first_request_at"] or 0)
    rate = stats["accepted"] / span if span > 0 else 0.0
    steady = [w for t, w in windows if t - t0 >= 0.2 * elapsed] or [w for _, w in windows]
    return {
        "hidden_limit": limit,
        "latency_ms": latency_ms,
        "lines": lines,
        "seconds": round(elapsed, 2),
        "upstream_requests": stats["requests"],
        "accepted": stats["accepted"],
        "rejected_429": stats["rejected_429"],
        "share_429": round(stats["rejected_429"] / max(1, stats["requests"]), 4),
        "peak_in_flight": stats["max_in_flight"],
        "lines_per_s": round(rate, 1),
        "ideal_lines_per_s": round(ideal, 1),
        "throughput_vs_ideal": round(rate / ideal, 3),
        "window_mean": round(statistics.fmean(steady), 2) if steady else None,
        "window_min": round(min(steady), 2) if steady else None,
        "window_max": round(max(steady), 2) if steady else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aimd", description=__doc__.splitlines()[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[8, 32], metavar="N", help="hidden limits (8 32)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="the mock's latency (100)")
    parser.add_argument("--seconds", type=float, default=30.0, help="about how long each batch runs (30)")
    parser.add_argument(
        "--no-adaptive",
        action="store_true",
        help="turn adaptive concurrency off (SLUICE_ADAPTIVE_CONCURRENCY=off), to compare",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    try:
        for limit in args.limits:
            with tempfile.TemporaryDirectory(prefix=f"sluice-aimd-{limit}-") as tmp:
                result = asyncio.run(run_one(limit, args.latency_ms, args.seconds, Path(tmp), not args.no_adaptive))
            results.append(result)
            print(
                f"N={limit:>3}  lines={result['lines']:>6}  {result['seconds']:>6.1f}s  "
                f"429 share={result['share_429']:.2%} ({result['rejected_429']}/{result['upstream_requests']})  "
                f"throughput={result['lines_per_s']}/s = {result['throughput_vs_ideal']:.3f} x ideal "
                f"{result['ideal_lines_per_s']}/s  peak in flight={result['peak_in_flight']}  "
                f"window mean={result['window_mean']} min={result['window_min']} max={result['window_max']}",
                flush=True,
            )
    except BenchError as e:
        print(f"bench.aimd: {e}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
