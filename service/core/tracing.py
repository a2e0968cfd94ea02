"""Optional OpenTelemetry traces of batches and of a sample of their lines, exported with OTLP/HTTP.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set
(``Settings.otel_traces_endpoint``): then every function here returns at once and the
opentelemetry packages (the ``otel`` extra) are never imported.

One trace per batch, its ids fixed when the batch is created and kept in the batch's hash
(``TRACEPARENT_FIELD``), so every process adds to the same trace:

    sluice.batch                 created -> terminal state (emitted at the end; its parent is the
    |                            client's span when POST /v1/batches carried a traceparent header)
    +- sluice.validation         a web process validating the input file
    +- sluice.feeding            in_progress -> the last line published (the web process that fed it)
    +- sluice.running            in_progress -> every line has a result (emitted by the finalizer)
    |  +- sluice.line            one sampled line: published -> recorded (a worker)
    |     +- sluice.queue        published -> read by the worker
    |     +- sluice.upstream     the provider call, retries included
    |     |  +- sluice.attempt   one HTTP attempt (its status)
    |     +- sluice.record       the recording script's round trip
    +- sluice.finalizing         every line has a result -> terminal state (the finalizer)

Spans that outlive a process (the batch, running) are emitted by whoever sees them end, with
their start times read from the batch's hash and their span ids derived from the trace, so
children emitted earlier by other processes point at them. Lines are sampled at
``SLUICE_TRACE_LINE_SAMPLE`` by a hash of the trace id and the line index, so the web process
publishing a line and the worker running it agree without talking; a sampled line carries the
time it was published in its stream entry (``QUEUED_FIELD``).

Log lines of traced work carry ``trace_id`` (and ``span_id`` for a sampled line) through
structlog's context variables.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import re
import secrets
import time
from typing import Any, Iterator

import structlog

from . import streams
from .config import Settings
from .records import BatchField, BatchRecord

# Batch hash fields: the W3C traceparent of the batch's root span, when the batch was created
# (ns), when it started running (ns), and the client's span the root hangs under (if any).
TRACEPARENT_FIELD = BatchField.TRACEPARENT
STARTED_FIELD = BatchField.TRACE_STARTED_NS
RUNNING_FIELD = BatchField.TRACE_RUNNING_NS
PARENT_FIELD = BatchField.TRACE_PARENT
# Stream entry field of a sampled line: when it was published (ns), the start of its queue wait.
QUEUED_FIELD = streams.LINE_QUEUED_NS.decode()

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_MASK64 = (1 << 64) - 1

log = structlog.get_logger("sluice.tracing")


class _State:
    __slots__ = ("tracer", "provider", "sample", "api", "forced")

    def __init__(self) -> None:
        self.tracer: Any = None  # an opentelemetry Tracer once set up; None: tracing is off
        self.provider: Any = None
        self.sample = 0.0
        self.api: Any = None  # the opentelemetry.trace module
        # (trace id, span id) the next span must have: spans that other processes already point at.
        self.forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("forced", default=None)


_state = _State()


def enabled() -> bool:
    """True once :func:`setup` turned tracing on in this process."""
    return _state.tracer is not None


def line_sample() -> float:
    """The share of lines traced (``SLUICE_TRACE_LINE_SAMPLE``); 0 when tracing is off."""
    return _state.sample if _state.tracer is not None else 0.0


def setup(settings: Settings, role: str) -> bool:
    """Turn tracing on for this process when the settings name an OTLP endpoint; True if on."""
    if not settings.otel_traces_endpoint or _state.tracer is not None:
        return _state.tracer is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    forced = _state.forced

    class _Ids(RandomIdGenerator):
        """Random ids, except for a span whose id other processes already use as a parent."""

        def generate_span_id(self) -> int:
            ids = forced.get()
            return ids[1] if ids else super().generate_span_id()

        def generate_trace_id(self) -> int:
            ids = forced.get()
            return ids[0] if ids else super().generate_trace_id()

    resource = Resource.create({"service.name": settings.otel_service_name, "sluice.role": role})
    # Sampling is Sluice's own (batches always, lines by SLUICE_TRACE_LINE_SAMPLE), not the SDK's.
    provider = TracerProvider(resource=resource, id_generator=_Ids(), sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_traces_endpoint)))
    _state.provider = provider
    _state.api = trace
    _state.sample = settings.trace_line_sample
    _state.tracer = provider.get_tracer("sluice")
    log.info("tracing_on", endpoint=settings.otel_traces_endpoint, line_sample=settings.trace_line_sample)
    return True


def shutdown() -> None:
    """Export what is buffered and stop (a clean process exit)."""
    if _state.provider is not None:
        _state.provider.shutdown()
        _state.provider = _state.tracer = None


# ----------------------------------------------------------------------------- ids
def _ids(rec: BatchRecord) -> tuple[int, int] | None:
    """(trace id, root span id) of a traced batch's record."""
    m = _TRACEPARENT.match(rec.traceparent)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def _derived_span_id(trace_id: int, name: str) -> int:
    digest = hashlib.sha256(f"{trace_id:032x}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def trace_id_of(traceparent: str) -> str:
    """The trace id (hex) in a traceparent, or ""."""
    m = _TRACEPARENT.match(traceparent or "")
    return m.group(1) if m else ""


def new_batch_fields(client_traceparent: str | None = None) -> dict[str, str]:
    """The trace fields of a new batch's hash; {} when tracing is off.

    A valid ``traceparent`` header from the client puts the batch in the client's trace.
    """
    if _state.tracer is None:
        return {}
    m = _TRACEPARENT.match((client_traceparent or "").strip().lower())
    trace_id = m.group(1) if m and int(m.group(1), 16) and int(m.group(2), 16) else secrets.token_hex(16)
    fields = {TRACEPARENT_FIELD: f"00-{trace_id}-{secrets.token_hex(8)}-01", STARTED_FIELD: str(time.time_ns())}
    if m and trace_id == m.group(1):
        fields[PARENT_FIELD] = m.group(2)
    return fields


def running_fields(rec: BatchRecord) -> dict[str, str]:
    """The field to set when a traced batch starts running (its start time); {} otherwise."""
    if _state.tracer is None or not rec.traceparent:
        return {}
    return {RUNNING_FIELD: str(time.time_ns())}


def log_fields(rec: BatchRecord) -> dict[str, str]:
    """``trace_id`` for a log line about a traced batch; {} otherwise."""
    trace_id = trace_id_of(rec.traceparent) if _state.tracer is not None else ""
    return {"trace_id": trace_id} if trace_id else {}


def _context(trace_id: int, span_id: int) -> Any:
    api = _state.api
    parent = api.SpanContext(trace_id, span_id, is_remote=True, trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED))
    return api.set_span_in_context(api.NonRecordingSpan(parent))


def _emit(
    name: str,
    parent: tuple[int, int] | None,
    start_ns: int,
    end_ns: int,
    *,
    ids: tuple[int, int] | None = None,
    attributes: dict[str, Any] | None = None,
    error: str = "",
) -> None:
    """A finished span, optionally with fixed ids, under ``parent`` (trace id, span id)."""
    api = _state.api
    from opentelemetry.context import Context

    token = _state.forced.set(ids) if ids else None
    try:
        context = _context(*parent) if parent else Context()
        span = _state.tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
    finally:
        if token is not None:
            _state.forced.reset(token)
    if error:
        span.set_status(api.Status(api.StatusCode.ERROR, error))
    span.end(end_time=max(end_ns, start_ns))


# ----------------------------------------------------------------------------- batch phases
@contextlib.contextmanager
def phase(rec: BatchRecord, name: str, **attributes: Any) -> Iterator[None]:
    """A span of one batch phase run here, under the batch's root; its logs carry the trace id."""
    ids = _ids(rec) if _state.tracer is not None else None
    if ids is None:
        yield
        return
    span = _state.tracer.start_span(name, context=_context(*ids), attributes={"sluice.batch_id": rec.id, **attributes})
    with (
        structlog.contextvars.bound_contextvars(trace_id=f"{ids[0]:032x}"),
        _state.api.use_span(span, end_on_exit=True),
    ):
        yield


def feeding_done(rec: BatchRecord, lines: int) -> None:
    """The last line of a traced batch was published: its feeding phase ends now."""
    ids = _ids(rec) if _state.tracer is not None else None
    start = rec.trace_running_ns
    if ids and start:
        _emit(
            "sluice.feeding", ids, start, time.time_ns(), attributes={"sluice.batch_id": rec.id, "sluice.lines": lines}
        )


def batch_finished(rec: BatchRecord, status: str, finishing_since_ns: int = 0) -> None:
    """A traced batch reached its terminal ``status``: emit its running and finalizing phases and its root."""
    ids = _ids(rec) if _state.tracer is not None else None
    if ids is None:
        return
    now = time.time_ns()
    trace_id, root = ids
    batch = {"sluice.batch_id": rec.id}
    running = rec.trace_running_ns
    if running:
        done = finishing_since_ns or now
        counts = {"sluice.total": rec.total, "sluice.completed": rec.completed, "sluice.failed": rec.failed}
        _emit(
            "sluice.running",
            ids,
            running,
            done,
            ids=(trace_id, _derived_span_id(trace_id, "running")),
            attributes={**batch, **counts},
        )
        _emit("sluice.finalizing", ids, done, now, attributes=batch)
    parent = int(rec.trace_parent, 16) if rec.trace_parent else 0
    _emit(
        "sluice.batch",
        (trace_id, parent) if parent else None,
        rec.trace_started_ns or now,
        now,
        ids=ids,
        attributes={**batch, "sluice.status": status, "sluice.endpoint": rec.endpoint},
        error="" if status == "completed" else status,
    )


# ----------------------------------------------------------------------------- lines
def sampled(traceparent: str, index: int) -> bool:
    """Whether line ``index`` of the batch with this traceparent is traced (the same answer everywhere)."""
    rate = _state.sample
    if _state.tracer is None or rate <= 0 or not traceparent:
        return False
    if rate >= 1:
        return True
    try:
        x = (int(traceparent[19:35], 16) ^ (index * 0x9E3779B97F4A7C15)) & _MASK64
    except ValueError:
        return False
    # splitmix64's finalizer: consecutive indexes spread uniformly.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x < rate * (1 << 64)


class LineTrace:
    """The spans of one sampled line in a worker: the line, its queue wait, its call and its recording."""

    def __init__(self, traceparent: str, *, batch_id: str, index: int, custom_id: str, queued_ns: int) -> None:
        m = _TRACEPARENT.match(traceparent)
        assert m is not None
        trace_id = int(m.group(1), 16)
        read = time.time_ns()
        parent = _context(trace_id, _derived_span_id(trace_id, "running"))
        self.span = _state.tracer.start_span(
            "sluice.line",
            context=parent,
            start_time=queued_ns or read,
            attributes={"sluice.batch_id": batch_id, "sluice.line": index, "sluice.custom_id": custom_id},
        )
        self.context = _state.api.set_span_in_context(self.span)
        if queued_ns:
            _state.tracer.start_span("sluice.queue", context=self.context, start_time=queued_ns).end(end_time=read)
        ctx = self.span.get_span_context()
        self.log_ids = {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}

    def upstream(self, provider: str, started_ns: int, attempts: Any) -> None:
        """The provider call that started at ``started_ns`` and just ended, with its attempts."""
        end = time.time_ns()
        span = _state.tracer.start_span(
            "sluice.upstream",
            context=self.context,
            start_time=started_ns,
            attributes={"sluice.provider": provider, "sluice.attempts": len(attempts.tries)},
        )
        inner = _state.api.set_span_in_context(span)
        for token, micros, ended in zip(attempts.tries, attempts.micros, attempts.ends_ns):
            status = token.split(":", 1)[0]
            attempt = _state.tracer.start_span(
                "sluice.attempt",
                context=inner,
                start_time=ended - micros * 1000,
                attributes={"http.response.status_code": status, "sluice.paused_provider": token.endswith(":p")},
            )
            attempt.end(end_time=ended)
        span.end(end_time=end)

    def recorded(self, started_ns: int, outcome: str) -> None:
        """The result was recorded (the script's round trip began at ``started_ns``): the line ends."""
        end = time.time_ns()
        _state.tracer.start_span("sluice.record", context=self.context, start_time=started_ns).end(end_time=end)
        self.span.set_attribute("sluice.outcome", outcome)
        self.span.end(end_time=end)

    def abandoned(self, reason: str) -> None:
        """The line ends here without a result recorded by this worker (it will be delivered again)."""
        self.span.set_status(_state.api.Status(_state.api.StatusCode.ERROR, reason))
        self.span.end()


def line_trace(traceparent: str, **kw: Any) -> LineTrace | None:
    """A :class:`LineTrace` for a sampled line of a traced batch; None otherwise (and when off)."""
    if _state.tracer is None or not traceparent or not sampled(traceparent, kw["index"]):
        return None
    return LineTrace(traceparent, **kw)
