"""The baseline: the plain asyncio + aiohttp script a user would write instead of a batch service.

    python bench/reference.py INPUT.jsonl BASE_URL CONCURRENCY OUTPUT.jsonl

Reads an OpenAI batch input file, keeps CONCURRENCY requests in flight against BASE_URL (any
OpenAI-compatible API; a base ending in ``/v1`` works too), writes one OpenAI batch result line
per request to OUTPUT.jsonl, and prints one JSON object on stdout::

    {"lines": N, "seconds": S, "lines_per_s": R, "concurrency": C,
     "progress": [[seconds, completed], ...]}   # a sample every 0.1 s

There are no retries: with a healthy upstream none are needed, and a failed request ends the run
with an error, so a broken baseline is never mistaken for a fast one. It deliberately stays
standalone (nothing imported from Sluice or the harness) so it measures only what a user pays.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import time
import uuid
from typing import IO, Any, Iterator

import aiohttp

SAMPLE_S = 0.1


def endpoint_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path`` without doubling ``/v1`` when both carry it."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[len("/v1") :]
    return base + path


def result_line(custom_id: str, status: int, request_id: str | None, body: Any) -> dict[str, Any]:
    """One line of an OpenAI batch output file."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


async def send(session: aiohttp.ClientSession, base_url: str, request: dict[str, Any]) -> dict[str, Any]:
    """POST one request line's body to its endpoint and return its result line."""
    async with session.post(endpoint_url(base_url, request["url"]), json=request["body"]) as resp:
        body = await resp.json()
        return result_line(request["custom_id"], resp.status, resp.headers.get("x-request-id"), body)


async def drain(
    lines: Iterator[str], session: aiohttp.ClientSession, base_url: str, out: IO[str], done: list[float], t0: float
) -> None:
    """Send lines until the shared iterator is exhausted, recording each completion time."""
    # Every task pulls from the same iterator, so the file is read once and lazily.
    for raw in lines:
        if not raw.strip():
            continue
        result = await send(session, base_url, json.loads(raw))
        out.write(json.dumps(result) + "\n")
        done.append(time.monotonic() - t0)


def progress(done: list[float], seconds: float) -> list[list[float]]:
    """``[t, completed]`` every ``SAMPLE_S`` seconds, from sorted completion times."""
    steps = int(seconds / SAMPLE_S) + 1
    samples = [[round(i * SAMPLE_S, 3), bisect.bisect_right(done, i * SAMPLE_S)] for i in range(steps)]
    samples.append([round(seconds, 3), len(done)])
    return samples


async def run(input_path: str, base_url: str, concurrency: int, output_path: str) -> dict[str, Any]:
    """Process the whole file and return the summary printed on stdout."""
    t0 = time.monotonic()
    done: list[float] = []
    # aiohttp allows 100 connections by default; the concurrency asked for must not be capped.
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Plain blocking file I/O on purpose (noqa): the reference is the simple client being measured.
        with (
            open(input_path, encoding="utf-8") as lines,  # noqa: ASYNC230
            open(output_path, "w", encoding="utf-8") as out,  # noqa: ASYNC230
        ):
            await asyncio.gather(*(drain(lines, session, base_url, out, done, t0) for _ in range(concurrency)))
    seconds = time.monotonic() - t0
    return {
        "lines": len(done),
        "seconds": round(seconds, 4),
        "lines_per_s": round(len(done) / seconds, 2) if seconds > 0 else None,
        "concurrency": concurrency,
        "progress": progress(done, seconds),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="OpenAI batch input file (JSONL)")
    parser.add_argument("base_url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("concurrency", type=int, help="requests in flight")
    parser.add_argument("output", help="where to write the result lines (JSONL)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("concurrency must be >= 1")
    summary = asyncio.run(run(args.input, args.base_url, args.concurrency, args.output))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
