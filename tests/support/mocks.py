"""Mock providers as processes: ``sluice mock-provider``, or ``tests/support/mock_server.py`` (the
same mock, plus a record of every request and gates that hold requests until a test releases them)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from .env import STARTUP_TIMEOUT_S, sluice_cmd
from .http import http_request, wait_for_200
from .ports import free_port
from .processes import ManagedProcess, ProcessRunner
from .waiting import wait_until


@dataclass(frozen=True)
class MockSpec:
    """Options of one mock provider process (``None``: the mock's default).

    ``max_concurrency``, ``rpm`` and ``window_s`` make the mock answer 429 beyond those limits;
    ``batch_*`` pace its Batch API (see service/devtools/mock_provider.py);
    ``record`` runs it through ``tests/support/mock_server.py``, which also keeps every API request;
    ``gates`` runs it there too, holding every request whose body has ``"mock_hold": "<gate>"``
    until the test calls :meth:`MockServer.release` (so "still running" never depends on a timer).
    """

    latency_ms: float | None = None
    error_rate: float | None = None
    max_concurrency: int | None = None
    rpm: int | None = None
    window_s: float | None = None
    batch_line_ms: float | None = None
    batch_start_ms: float | None = None
    batch_cancel_ms: float | None = None
    batch_window_ms: float | None = None
    retry_after: bool = True  # False: no 429 carries a Retry-After header
    record: bool = False
    gates: bool = False

    def command(self, port: int) -> list[str]:
        if self.record or self.gates:
            args = [sys.executable, "-m", "tests.support.mock_server", "--port", str(port)]
            if self.record:
                args.append("--record")
        else:
            args = sluice_cmd("mock-provider", "--port", str(port))
        for flag, value in (
            ("--latency-ms", self.latency_ms),
            ("--error-rate", self.error_rate),
            ("--max-concurrency", self.max_concurrency),
            ("--rpm", self.rpm),
            ("--window-s", self.window_s),
            ("--batch-line-ms", self.batch_line_ms),
            ("--batch-start-ms", self.batch_start_ms),
            ("--batch-cancel-ms", self.batch_cancel_ms),
            ("--batch-window-ms", self.batch_window_ms),
        ):
            if value is not None:
                args += [flag, str(value)]
        if not self.retry_after:
            args.append("--no-retry-after")
        return args


@dataclass
class MockServer:
    """A running mock provider: its URL, counters and (for a recording one) its requests."""

    name: str
    port: int
    process: ManagedProcess
    record: bool = False
    gates: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        res = http_request("GET", f"{self.url}/_mock/stats", timeout=10)
        assert res.status == 200, f"mock {self.name} stats answered {res.status}: {res.body[:300]!r}"
        return res.json()

    def reset(self) -> None:
        res = http_request("POST", f"{self.url}/_mock/reset", timeout=10)
        assert res.status in (200, 204), f"mock {self.name} reset answered {res.status}: {res.body[:300]!r}"

    def requests(self) -> list[dict]:
        """Every API request since the last reset, oldest first (recording mocks only).

        Each is ``{"at", "method", "path", "authorization", "model", "content", "status"}``; ``content`` is the
        last chat message's content (or ``prompt`` / ``input``), ``at`` the ``time.time()`` of arrival.
        """
        assert self.record, f"mock {self.name} does not record requests (start it with MockSpec(record=True))"
        res = http_request("GET", f"{self.url}/_mock/requests", timeout=10)
        assert res.status == 200, f"mock {self.name} requests answered {res.status}: {res.body[:300]!r}"
        return res.json()

    # ---- gates (MockSpec(gates=True))

    def held(self) -> dict[str, int]:
        """Requests held right now, by gate (gates holding none are left out)."""
        assert self.gates, f"mock {self.name} has no gates (start it with MockSpec(gates=True))"
        res = http_request("GET", f"{self.url}/_mock/held", timeout=10)
        assert res.status == 200, f"mock {self.name} held answered {res.status}: {res.body[:300]!r}"
        return res.json()

    def wait_held(self, gate: str, count: int = 1, *, timeout: float = 60.0) -> int:
        """Wait until at least ``count`` requests are held at ``gate``; return how many are."""
        return wait_until(
            lambda: (n := self.held().get(gate, 0)) >= count and n,
            timeout=timeout,
            message=f"{count} request(s) held at gate {gate!r} of mock {self.name}",
        )

    def release(self, gate: str) -> None:
        """Open ``gate``: the requests it holds are answered, and later ones pass straight through."""
        assert self.gates, f"mock {self.name} has no gates (start it with MockSpec(gates=True))"
        res = http_request("POST", f"{self.url}/_mock/release", json_body={"gate": gate}, timeout=10)
        assert res.status == 200, f"mock {self.name} release answered {res.status}: {res.body[:300]!r}"

    def wait_ready(self, runner: "ProcessRunner") -> None:
        wait_for_200(
            f"{self.url}/_mock/stats",
            what=f"mock provider {self.name}",
            timeout=STARTUP_TIMEOUT_S,
            check=runner.check_alive,
        )


def mock_spec(spec: MockSpec | Mapping[str, Any]) -> MockSpec:
    """A :class:`MockSpec` from itself or from its options as a dict (test modules need no import)."""
    return MockSpec(**spec) if isinstance(spec, Mapping) else spec


def start_mock(runner: "ProcessRunner", name: str, spec: MockSpec, *, env: Mapping[str, str]) -> MockServer:
    """Start a mock provider on a free port (not waiting for it: see :meth:`MockServer.wait_ready`)."""
    port = free_port()
    proc_name = "mock-provider" if name == "default" else f"mock-{name}"
    proc = runner.start(proc_name, spec.command(port), env={**env, "SLUICE_LOG_LEVEL": "info"})
    return MockServer(name=name, port=port, process=proc, record=spec.record, gates=spec.gates)
