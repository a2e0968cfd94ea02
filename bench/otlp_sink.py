"""A trace sink for benchmarks: ``python -m bench.otlp_sink [--port 4318]``.

Accepts OTLP/HTTP trace exports on 127.0.0.1 (``POST /v1/traces``), counts the requests and bytes
and throws the spans away, so ``make bench BENCH_ARGS="--env OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318"``
measures what tracing costs Sluice, not a collector. Prints its counts on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; print how many exports and bytes arrived."""
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    counts = {"requests": 0, "bytes": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                counts["requests"] += 1
                counts["bytes"] += len(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"otlp sink: {counts['requests']} exports, {counts['bytes']} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
