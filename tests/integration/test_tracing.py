"""OpenTelemetry traces of a batch, exported by real processes (web, worker, finalizer) with OTLP/HTTP
to a tiny collector on loopback: every phase and every sampled line, with the expected parents, in
the trace the client started, and the trace id in the log lines of that work."""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the opentelemetry packages (test extra) are not installed",
)

PHASES = {"sluice.validation", "sluice.feeding", "sluice.running", "sluice.finalizing"}


def _value(v) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector:
    """Receives OTLP/HTTP (protobuf) trace exports on 127.0.0.1 and keeps every span, as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                reply = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request) -> None:
        found = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "status": s.status.code,
                            "role": resource.get("sluice.role"),
                            "service": resource.get("service.name"),
                        }
                    )
        with self.lock:
            self.spans += found

    def of(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = Collector()
    try:
        yield c
    finally:
        c.close()


def test_a_batch_is_traced_across_processes(stack_factory, collector, wait_until):
    stack = stack_factory.start(
        name="traced",
        workers=1,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "SLUICE_TRACE_LINE_SAMPLE": "1",
            "OTEL_SERVICE_NAME": "sluice-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    run = uuid.uuid4().hex[:8]
    rows = [stack.chat_line(f"ok-{run}-{i}", f"fine {i}") for i in range(8)]
    flaky = f"flaky-{run}"
    rows.append(stack.chat_line(flaky, "flaky", mock_status=500, mock_fail_times=1))
    client = stack.client()
    upload = stack.upload_jsonl(rows, client=client)
    # The client's own trace: the batch's spans join it.
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert stack.wait_for_batch(created.id, timeout=60).status == "completed"

    def complete():
        spans = collector.of(trace_id)
        names = [s["name"] for s in spans]
        ready = "sluice.batch" in names and names.count("sluice.line") == len(rows) and PHASES <= set(names)
        return spans if ready else None

    spans = wait_until(
        complete,
        timeout=30,
        interval=0.2,
        message=lambda: f"every span of the batch; got {sorted(s['name'] for s in collector.of(trace_id))}",
        check=stack.check_alive,
    )
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (root,) = by_name["sluice.batch"]
    assert root["parent"] == client_span and root["role"] == "finalizer" and root["service"] == "sluice-test"
    assert root["attributes"]["sluice.batch_id"] == created.id and root["attributes"]["sluice.status"] == "completed"
    for name in PHASES:
        (phase,) = by_name[name]
        assert phase["parent"] == root["span_id"], phase
        assert root["start"] <= phase["start"] <= phase["end"] <= root["end"], (name, phase, root)
    assert by_name["sluice.validation"][0]["role"] == "web" and by_name["sluice.feeding"][0]["role"] == "web"
    running = by_name["sluice.running"][0]
    assert running["attributes"]["sluice.completed"] == len(rows)

    children: dict[str, list[dict]] = {}
    for s in spans:
        children.setdefault(s["parent"], []).append(s)
    lines = by_name["sluice.line"]
    assert {line["parent"] for line in lines} == {running["span_id"]}
    assert {line["role"] for line in lines} == {"worker"}
    for line in lines:
        kids = sorted(k["name"] for k in children.get(line["span_id"], []))
        assert kids == ["sluice.queue", "sluice.record", "sluice.upstream"], (line, kids)
        (upstream,) = [k for k in children[line["span_id"]] if k["name"] == "sluice.upstream"]
        statuses = [
            a["attributes"]["http.response.status_code"]
            for a in sorted(children.get(upstream["span_id"], []), key=lambda a: a["start"])
        ]
        assert statuses == (["500", "200"] if line["attributes"]["sluice.custom_id"] == flaky else ["200"]), statuses
        assert line["attributes"]["sluice.outcome"] == "completed"

    # The trace id is in the log lines of that work, in every process.
    def logged(name: str, event: str) -> list[dict]:
        text = stack.process(name).log_path.read_text()
        return [e for e in (json.loads(x) for x in text.splitlines() if x.startswith("{")) if e.get("event") == event]

    (retry,) = logged("worker-1", "upstream_retry")
    flaky_line = next(s for s in lines if s["attributes"]["sluice.custom_id"] == flaky)
    assert (retry["trace_id"], retry["span_id"]) == (trace_id, flaky_line["span_id"]), retry
    assert [e["trace_id"] for e in logged("web", "validated")] == [trace_id]
    assert [e["trace_id"] for e in logged("finalizer", "batch_finished")] == [trace_id]
