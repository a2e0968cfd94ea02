"""What tracing costs a worker per line: ``python -m bench.trace_cost [--lines N] [--sample R]``.

Runs the worker's per-line tracing hooks (``Worker._trace``, then the upstream and recording
spans of a sampled line, with one retried attempt) for N lines, in-process, and reports the CPU
(``time.process_time``: the exporter's thread included) per 1,000 lines for: tracing off (the
``Settings`` default), tracing on with the default sample (0.01), and tracing on with ``--sample``
(1.0: every line). Spans go by OTLP/HTTP to ``bench/otlp_sink.py`` in a process of its own, so its
CPU is not counted; the processor is flushed before the clock stops, so export is counted.

Each mode runs in a fresh interpreter (tracing is set up once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
from service.core import tracing
from service.core.config import Settings
from service.core.counters import Attempts
from workers.worker import BatchInfo, Line, Worker

lines, endpoint, sample = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
settings = Settings(otel_traces_endpoint=endpoint, trace_line_sample=sample)
tracing.setup(settings, "worker")
worker = Worker(settings)
fields = tracing.new_batch_fields() or {tracing.TRACEPARENT_FIELD: ""}
info = BatchInfo("o", "/v1/chat/completions", "", fields[tracing.TRACEPARENT_FIELD])
queued = time.time_ns()
traced_lines = 0
start = time.process_time()
for i in range(lines):
    line = Line("batch_x", f"0-{i + 1}", i, f"c{i}", b"{}", "default", 1, queued)
    # What Worker._process does around the call and the recording, for tracing only.
    traced = worker._trace(line, info) if info.traceparent else None
    attempts = Attempts("default", timed=traced is not None)
    called = time.time_ns() if traced else 0
    attempts.add("200", 0.012, time.time_ns() if attempts.timed else 0)
    if traced:
        traced_lines += 1
        traced.upstream(attempts.provider, called, attempts)
    recording = time.time_ns() if traced else 0
    attempts.encode("completed")
    if traced:
        traced.recorded(recording, "completed")
tracing.shutdown()  # export everything still buffered: counted
print(json.dumps({"cpu_s": time.process_time() - start, "traced": traced_lines,
                  "on": bool(endpoint)}))
"""


def _child(lines: int, endpoint: str, sample: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SLUICE_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(lines), endpoint, str(sample)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Start the sink, run each mode ``--repeat`` times (best kept), print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--sample", type=float, default=1.0, help="the third mode's sample (default 1.0)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.otlp_sink", "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the OTLP sink did not start") from None
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        modes = (
            ("off", "", 0.01),
            ("on, sample 0.01", endpoint, 0.01),
            (f"on, sample {args.sample:g}", endpoint, args.sample),
        )
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, url, sample in modes:
                got = _child(args.lines, url, sample)
                if name not in best or got["cpu_s"] < best[name]["cpu_s"]:
                    best[name] = got
        print(f"{args.lines:,} lines; worker CPU ms per 1,000 lines spent on tracing hooks (best of {args.repeat})")
        for name, _, _ in modes:
            got = best[name]
            print(f"  {name:20}{got['cpu_s'] * 1e6 / args.lines:10.2f} ms   ({got['traced']} lines traced)")
    finally:
        sink.terminate()
        _, err = sink.communicate(timeout=10)
        print(err.strip(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
