"""``GET /metrics``: the cluster's snapshot (service/core/cluster.py) as Prometheus text.

Any web process answers for the whole cluster, so scrape one of them (or all: they agree).

The line and upstream counters are exact (service/core/counters.py): they move in the same atomic
step that records a line's result, so ``sluice_lines_total`` by outcome always equals the sum of
every batch's ``request_counts``; the upstream counters count the attempts of the lines recorded.
Gauges are read from the cluster's state at scrape time.
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from service.core.cluster import Snapshot, as_int, snapshot
from service.core.config import Settings
from service.core.counters import LATENCY_BUCKETS
from service.core.heartbeat import ROLES, STALE_AFTER_S
from service.core.store import Redis

# ------------------------------------------------------------------------------ Prometheus

# Fields of a latency series that are not histogram buckets.
_NOT_BUCKETS = frozenset({"sum", "sum_us", "count"})


class ClusterCollector:
    """A prometheus_client collector over one :class:`Snapshot`."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self):
        snap = self.snap
        lines = CounterMetricFamily(
            "sluice_lines",
            "Request lines recorded, by outcome (cluster total; exact: always the sum of the batches' request_counts).",
            labels=["outcome"],
        )
        for outcome in sorted({"completed", "failed", *snap.lines}):
            lines.add_metric([outcome], snap.lines.get(outcome, 0))
        yield lines

        # Latency histogram and request counts, from "<provider>|<status>|<le|sum|count>" fields.
        series: dict[tuple[str, str], dict[str, str]] = {}
        for f, v in snap.latency.items():
            try:
                provider, status, part = f.rsplit("|", 2)
            except ValueError:
                continue
            series.setdefault((provider, status), {})[part] = v
        hist = HistogramMetricFamily(
            "sluice_upstream_request_duration_seconds",
            "Time of one upstream request, by provider and answer status (attempts of the lines recorded).",
            labels=["provider", "status"],
        )
        requests = CounterMetricFamily(
            "sluice_upstream_requests",
            "Upstream requests, by provider and answer "
            "status (an HTTP status, timeout, connection_error or aborted); exact: the "
            "attempts of every line recorded.",
            labels=["provider", "status"],
        )
        for (provider, status), parts in sorted(series.items()):
            count = as_int(parts.get("count"))
            # Every series gets every bound (sums over series need the same buckets), stored or not.
            stored = {float(le): as_int(v) for le, v in parts.items() if le not in _NOT_BUCKETS}
            buckets, running = [], 0
            for le in sorted(set(LATENCY_BUCKETS) | set(stored)):
                running += stored.get(le, 0)
                buckets.append((floatToGoString(le), running))
            buckets.append(("+Inf", count))
            # "sum" (seconds) is what versions before exact counting folded in; "sum_us" is exact.
            total = float(parts.get("sum") or 0.0) + as_int(parts.get("sum_us")) / 1e6
            hist.add_metric([provider, status], buckets, total)
            requests.add_metric([provider, status], count)
        yield hist
        yield requests

        for what, name, doc in (
            (
                "retries",
                "sluice_upstream_retries",
                "Upstream requests retried after a transient failure (exact, for the lines recorded).",
            ),
            (
                "rate_limited",
                "sluice_upstream_rate_limited",
                "Upstream answers with status 429 (exact, for the lines recorded).",
            ),
            (
                "pauses",
                "sluice_provider_pauses",
                "Pauses of a provider for every worker after a 429 (exact, for the lines recorded).",
            ),
        ):
            fam = CounterMetricFamily(name, doc, labels=["provider"])
            totals: dict[str, int] = {p.name: 0 for p in snap.providers}
            for f, n in snap.upstream.items():
                kind, _, provider = f.partition("|")
                if kind == what:
                    totals[provider] = totals.get(provider, 0) + n
            for provider, total in sorted(totals.items()):
                fam.add_metric([provider], total)
            yield fam

        # Tokens of successful lines (executed or delegated), by provider and model.
        tokens = CounterMetricFamily(
            "sluice_tokens",
            "Tokens used by successful lines, by provider, model and type "
            "(input, cached, output, reasoning; cached is part of input, reasoning of "
            "output).",
            labels=["provider", "model", "type"],
        )
        usage_lines = CounterMetricFamily(
            "sluice_usage_lines",
            "Successful lines whose tokens were counted, by provider and model.",
            labels=["provider", "model"],
        )
        for f, n in sorted(snap.tokens.items()):
            try:
                provider, model, kind = f.split("|")
            except ValueError:
                continue
            if kind == "requests":
                usage_lines.add_metric([provider, model], n)
            else:
                tokens.add_metric([provider, model, kind], n)
        yield tokens
        yield usage_lines

        # Processes (heartbeats).
        procs = GaugeMetricFamily(
            "sluice_processes",
            "Web, worker and finalizer processes: live (beating) or stale "
            f"(no heartbeat for {STALE_AFTER_S:g} s; listed for 10 min).",
            labels=["role", "state"],
        )
        counts = {(role, state): 0 for role in ROLES for state in ("live", "stale")}
        for p in snap.processes:
            key = (p.role, "live" if p.live else "stale")
            counts[key] = counts.get(key, 0) + 1
        for (role, state), n in sorted(counts.items()):
            procs.add_metric([role, state], n)
        yield procs
        age = GaugeMetricFamily(
            "sluice_process_heartbeat_age_seconds",
            "Seconds since a process's last heartbeat.",
            labels=["role", "process", "host"],
        )
        up = GaugeMetricFamily(
            "sluice_process_up",
            "1 while a process heart-beats, 0 once it is stale.",
            labels=["role", "process", "host"],
        )
        held = GaugeMetricFamily(
            "sluice_worker_lines_in_flight",
            "Lines a live worker holds (calling, waiting for a provider slot or recording).",
            labels=["process"],
        )
        serving = GaugeMetricFamily(
            "sluice_web_requests_in_flight",
            "HTTP requests a live web process is serving (event streams included).",
            labels=["process"],
        )
        for p in snap.processes:
            age.add_metric([p.role, p.name, p.host], round(p.age_s, 3))
            up.add_metric([p.role, p.name, p.host], 1 if p.live else 0)
            if p.role == "worker" and p.live:
                held.add_metric([p.name], p.int("in_flight"))
            if p.role == "web" and p.live:
                serving.add_metric([p.name], p.int("in_flight"))
        yield age
        yield up
        yield held
        yield serving

        # Providers.
        inflight = GaugeMetricFamily(
            "sluice_upstream_requests_in_flight", "Requests at a provider now (live workers).", labels=["provider"]
        )
        paused = GaugeMetricFamily(
            "sluice_provider_paused_seconds", "Seconds left of a provider's pause after a 429.", labels=["provider"]
        )
        ramping = GaugeMetricFamily(
            "sluice_provider_ramping", "1 while a provider's concurrency ramps back after a pause.", labels=["provider"]
        )
        leases = GaugeMetricFamily(
            "sluice_provider_leases", "Concurrency leases held at a provider with limits.", labels=["provider"]
        )
        limit = GaugeMetricFamily(
            "sluice_provider_concurrency_limit",
            "Requests a provider may have in flight now, "
            "all workers together: its adaptive window, else its max_concurrency.",
            labels=["provider"],
        )
        limit_max = GaugeMetricFamily(
            "sluice_provider_concurrency_max",
            "What bounds a provider's concurrency: its "
            "configured max_concurrency, else (adaptive) the live workers' slots.",
            labels=["provider"],
        )
        window = GaugeMetricFamily(
            "sluice_provider_concurrency_window",
            "A provider's adaptive concurrency window (AIMD; its integer part is the limit).",
            labels=["provider"],
        )
        for prov in snap.providers:
            inflight.add_metric([prov.name], prov.requests_in_flight)
            paused.add_metric([prov.name], round(prov.paused_for_s, 3))
            ramping.add_metric([prov.name], 1 if prov.ramping else 0)
            leases.add_metric([prov.name], prov.leases)
            if prov.limit is not None:
                limit.add_metric([prov.name], prov.limit)
            if prov.ceiling is not None:
                limit_max.add_metric([prov.name], prov.ceiling)
            if prov.window is not None:
                window.add_metric([prov.name], round(prov.window, 3))
        yield inflight
        yield paused
        yield ramping
        yield leases
        yield limit
        yield limit_max
        yield window

        # Batches.
        by_status = GaugeMetricFamily("sluice_batches", "Batches not yet finished, by status.", labels=["status"])
        statuses = {s: 0 for s in ("validating", "in_progress", "finalizing", "cancelling")}
        for b in snap.batches:
            statuses[b.status] = statuses.get(b.status, 0) + 1
        for s, n in sorted(statuses.items()):
            by_status.add_metric([s], n)
        yield by_status
        waiting = GaugeMetricFamily(
            "sluice_batch_lines_waiting", "Lines of a running batch without a result yet.", labels=["batch_id"]
        )
        pending = GaugeMetricFamily(
            "sluice_batch_lines_pending",
            "Lines of a running batch claimed by a worker and not acknowledged yet (XPENDING).",
            labels=["batch_id"],
        )
        per_provider: dict[str, int] = {p.name: 0 for p in snap.providers}
        for b in snap.batches:
            if b.status == "validating":
                continue
            waiting.add_metric([b.id], b.waiting)
            pending.add_metric([b.id], b.pending)
            per_provider[b.provider or "unknown"] = per_provider.get(b.provider or "unknown", 0) + b.waiting
        yield waiting
        yield pending
        by_provider = GaugeMetricFamily(
            "sluice_provider_lines_waiting",
            "Lines without a result yet, by the provider "
            "of their batch (a batch mixing models counts under its first line's).",
            labels=["provider"],
        )
        for provider, n in sorted(per_provider.items()):
            by_provider.add_metric([provider], n)
        yield by_provider
        yield GaugeMetricFamily(
            "sluice_lines_pending",
            "Lines claimed by workers and not acknowledged, all batches.",
            value=sum(b.pending for b in snap.batches),
        )

        # Finalizer.
        yield GaugeMetricFamily(
            "sluice_finalizer_lag_lines",
            "Results recorded and not yet written to result files.",
            value=sum(b.undrained for b in snap.batches),
        )
        yield GaugeMetricFamily(
            "sluice_finalizer_lag_seconds",
            "Age of the oldest result not yet written.",
            value=round(max((b.oldest_undrained_s for b in snap.batches if b.undrained), default=0.0), 3),
        )
        finalizers = sorted((p for p in snap.processes if p.role == "finalizer" and p.live), key=lambda p: p.name)
        leased = GaugeMetricFamily(
            "sluice_finalizer_leased_batches",
            "Running batches whose lease a live finalizer holds (each finalizes its own).",
            labels=["process"],
        )
        tick = GaugeMetricFamily(
            "sluice_finalizer_last_tick_age_seconds",
            "Seconds since a live finalizer finished a pass over the batches it holds.",
            labels=["process"],
        )
        for p in finalizers:
            leased.add_metric([p.name], snap.leased_batches(p.name))
            try:
                since = float(p.fields.get("since_tick_s") or 0)
            except ValueError:
                since = 0.0
            tick.add_metric([p.name], round(since + p.age_s, 3))
        yield leased
        yield tick
        yield GaugeMetricFamily(
            "sluice_finalizer_unleased_batches",
            "Running batches no finalizer holds: none is at work, or one stopped and its leases have not expired yet.",
            value=snap.unleased_batches,
        )


def exposition(snap: Snapshot) -> bytes:
    """The Prometheus text exposition of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(snap))
    return generate_latest(registry)


def authorized(settings: Settings, header: str) -> bool:
    """Whether a scrape may read /metrics: always without ``SLUICE_METRICS_TOKEN``, else with it as bearer."""
    if not settings.metrics_token:
        return True
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.metrics_token.encode())


async def handler(request: web.Request, r: Redis, settings: Settings) -> web.Response:
    """``GET /metrics``."""
    if not authorized(settings, request.headers.get("Authorization", "")):
        return web.Response(
            status=401,
            text="metrics need the bearer token SLUICE_METRICS_TOKEN\n",
            headers={"WWW-Authenticate": "Bearer"},
        )
    started = time.perf_counter()
    snap = await snapshot(r, settings)
    body = exposition(snap)
    body += (
        f"# HELP sluice_scrape_duration_seconds Time this web process took to read the cluster's state.\n"
        f"# TYPE sluice_scrape_duration_seconds gauge\n"
        f"sluice_scrape_duration_seconds {time.perf_counter() - started:.6f}\n"
    ).encode()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
