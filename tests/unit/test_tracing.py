"""Tracing is optional: off, it imports nothing of OpenTelemetry; on, lines are sampled the same way
in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.core import tracing
from service.core.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

_PROBE = """
import json, sys
env, absent = json.loads(sys.argv[1]), sys.argv[2] == "absent"
if absent:  # as without the otel extra: any import of opentelemetry fails
    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _Absent())
from service.core import tracing
from service.core.config import Settings
import service.web.app, workers.worker, workers.finalizer  # every module a process loads
on = tracing.setup(Settings.from_env(env), "worker")
fields = tracing.new_batch_fields(None)
sampled = tracing.sampled(fields.get(tracing.TRACEPARENT_FIELD, ""), 0)
tracing.shutdown()
print(json.dumps({"on": on, "fields": sorted(fields), "sampled": sampled,
                  "otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")}))
"""
# What Sluice's tracing loads; redis-py (8.x) itself imports the OpenTelemetry API and metrics SDK
# whenever they are installed, for its own metrics (off unless an application turns them on).
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter")


def _probe(env: dict[str, str], *, absent: bool = False) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SLUICE_"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(env), "absent" if absent else "installed"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_off_needs_and_loads_no_tracing_code():
    # Without the otel extra every process runs, tracing off, and nothing of OpenTelemetry loads.
    assert _probe({}, absent=True) == {"on": False, "fields": [], "sampled": False, "otel": []}
    # With it installed, off still loads none of the tracing SDK or exporter.
    off = _probe({})
    assert (off["on"], off["fields"], off["sampled"]) == (False, [], False)
    assert not [m for m in off["otel"] if m.startswith(TRACING_MODULES)], off["otel"]
    # The control: an endpoint turns tracing on and loads them (nothing is exported: no span ends).
    on = _probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "SLUICE_TRACE_LINE_SAMPLE": "1"})
    assert on["on"] and on["sampled"] and on["fields"] == sorted([tracing.TRACEPARENT_FIELD, tracing.STARTED_FIELD])
    assert [m for m in on["otel"] if m.startswith(TRACING_MODULES)]


def test_settings():
    assert Settings.from_env({}).otel_traces_endpoint == ""
    assert (
        Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}).otel_traces_endpoint
        == "http://c:4318/v1/traces"
    )
    assert (
        Settings.from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}
        ).otel_traces_endpoint
        == "http://t/x"
    )
    assert (
        Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}).otel_traces_endpoint
        == ""
    )
    assert Settings.from_env({}).trace_line_sample == 0.01
    for env, name in (
        ({"SLUICE_TRACE_LINE_SAMPLE": "1.5"}, "SLUICE_TRACE_LINE_SAMPLE"),
        ({"SLUICE_TRACE_LINE_SAMPLE": "nan"}, "SLUICE_TRACE_LINE_SAMPLE"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env(env)


def test_line_sampling_is_deterministic_and_near_its_rate(monkeypatch):
    assert not tracing.sampled(TRACEPARENT, 1)  # off
    monkeypatch.setattr(tracing._state, "tracer", object())
    monkeypatch.setattr(tracing._state, "sample", 0.1)
    picked = [i for i in range(20_000) if tracing.sampled(TRACEPARENT, i)]
    assert picked == [i for i in range(20_000) if tracing.sampled(TRACEPARENT, i)]
    assert 1700 < len(picked) < 2300, len(picked)
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert picked[:50] != [i for i in range(20_000) if tracing.sampled(other, i)][:50]
    monkeypatch.setattr(tracing._state, "sample", 1.0)
    assert all(tracing.sampled(TRACEPARENT, i) for i in range(100))
    monkeypatch.setattr(tracing._state, "sample", 0.0)
    assert not any(tracing.sampled(TRACEPARENT, i) for i in range(100))
