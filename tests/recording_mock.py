"""The mock provider of ``service.devtools.mock_provider``, plus a record of every API request it got.

Used by integration tests that must know which upstream (and which key) saw which request line,
which the mock's aggregated ``/_mock/stats`` cannot tell. Run as::

    python tests/recording_mock.py --port N [--latency-ms L] [--error-rate R] [--max-concurrency N]
                                   [--rpm N] [--window-s S] [--batch-line-ms MS] [--batch-start-ms MS]
                                   [--batch-cancel-ms MS] [--batch-window-ms MS]

``GET /_mock/requests`` answers the list of requests since the last ``POST /_mock/reset``, oldest
first, each ``{"at", "method", "path", "authorization", "model", "content", "status"}`` (``status`` is
null until the answer is ready, so a request under way can be seen). The body is read
before the mock's own handler runs, so provider-side limits are decided a moment later than in the
plain mock; tests measuring limits use the plain mock. Nothing here is ever printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.devtools.mock_provider import create_app, serve  # noqa: E402


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

    @web.middleware
    async def record(request: web.Request, handler):
        if request.path == "/_mock/requests":
            return web.json_response(recorded)
        if request.path.startswith("/_mock/"):
            if request.path == "/_mock/reset":
                recorded.clear()
            return await handler(request)
        body = None
        if not request.content_type.startswith("multipart/"):  # an upload's parts are read by the handler
            raw = await request.read()  # aiohttp keeps it: the handler reads the same bytes
            try:
                body = json.loads(raw)
            except ValueError:
                pass
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
        response = await handler(request)
        entry["status"] = response.status
        return response

    app.middlewares.append(record)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
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
