"""The mock provider of ``service.devtools.mock_provider``, with two test-only additions.

**Gates** (always on): an API request whose body has ``"mock_hold": "<gate>"`` is held before the
mock answers it, until ``POST /_mock/release`` with ``{"gate": "<gate>"}`` opens that gate; an open
gate lets later requests straight through. ``GET /_mock/held`` answers how many requests each gate
holds right now. Tests use gates instead of long latencies wherever "the batch is still running"
must hold: an event, not a timer, decides when the lines finish. ``POST /_mock/reset`` opens every
gate (so nothing stays held between tests) and forgets them.

**Recording** (``--record``): ``GET /_mock/requests`` answers the list of requests since the last
``POST /_mock/reset``, oldest first, each ``{"at", "method", "path", "authorization", "model",
"content", "status"}`` (``status`` is null until the answer is ready). Used by tests that must know which upstream (and which key) saw which request line,
which the mock's aggregated ``/_mock/stats`` cannot tell.

The body is read before the mock's own handler runs, so provider-side limits are decided a moment
later than in the plain mock; tests measuring limits use the plain mock. Nothing here is ever
printed or logged. Run as::

    python -m tests.support.mock_server --port N [--record] [--latency-ms L] [--error-rate R]
                                        [--max-concurrency N] [--rpm N] [--window-s S]

(from the repository root: the stacks start it with ``PYTHONPATH`` set to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

from service.devtools.mock_provider import create_app, serve


def _content(body: Any) -> Any:
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("content")
    for name in ("prompt", "input"):
        if name in body:
            return body[name]
    return None


def build(args: argparse.Namespace) -> web.Application:
    app = create_app(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        max_concurrency=args.max_concurrency,
        rpm=args.rpm,
        window_s=args.window_s,
        batch_line_ms=args.batch_line_ms,
        batch_start_ms=args.batch_start_ms,
        batch_cancel_ms=args.batch_cancel_ms,
        batch_window_ms=args.batch_window_ms,
        retry_after=not args.no_retry_after,
    )
    recorded: list[dict[str, Any]] = []
    gates: dict[str, asyncio.Event] = {}
    held: dict[str, int] = {}

    def gate(name: str) -> asyncio.Event:
        return gates.setdefault(name, asyncio.Event())

    async def control(request: web.Request, handler) -> web.StreamResponse:
        if request.path == "/_mock/requests":
            return web.json_response(recorded)
        if request.path == "/_mock/held":
            return web.json_response({name: n for name, n in held.items() if n})
        if request.path == "/_mock/release":
            try:
                name = (await request.json())["gate"]
            except (ValueError, KeyError, TypeError):
                return web.json_response({"error": 'POST {"gate": NAME}'}, status=400)
            gate(str(name)).set()
            return web.json_response({"released": str(name)})
        if request.path == "/_mock/reset":
            recorded.clear()
            for event in gates.values():
                event.set()
            gates.clear()
        return await handler(request)

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path.startswith("/_mock/"):
            return await control(request, handler)
        body = None
        if not request.content_type.startswith("multipart/"):  # an upload's parts are read by the handler
            raw = await request.read()  # aiohttp keeps it: the handler reads the same bytes
            try:
                body = json.loads(raw)
            except ValueError:
                pass
        entry = None
        if args.record:
            entry = {
                "at": time.time(),
                "method": request.method,
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "model": body.get("model") if isinstance(body, dict) else None,
                "content": _content(body),
                "status": None,
            }
            recorded.append(entry)
        hold = body.get("mock_hold") if isinstance(body, dict) else None
        if isinstance(hold, str):
            event = gate(hold)
            held[hold] = held.get(hold, 0) + 1
            try:
                await event.wait()
            finally:
                held[hold] -= 1
        response = await handler(request)
        if entry is not None:
            entry["status"] = response.status
        return response

    app.middlewares.append(middleware)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--record", action="store_true", help="keep every API request (GET /_mock/requests)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--batch-line-ms", type=float, default=0.0)
    parser.add_argument("--batch-start-ms", type=float, default=0.0)
    parser.add_argument("--batch-cancel-ms", type=float, default=0.0)
    parser.add_argument("--batch-window-ms", type=float, default=None)
    parser.add_argument("--no-retry-after", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(build(args), args.host, args.port))


if __name__ == "__main__":
    main()
