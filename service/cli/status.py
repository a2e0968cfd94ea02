"""``sluice status``: the cluster at a glance, in the terminal (read from Redis, like /metrics)."""

from __future__ import annotations

import asyncio
import sys
import time

from service.core.cluster import ProviderState, Snapshot, snapshot
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, connect

from .display import text_table

WATCH_S = 2.0


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def concurrency_limit(p: ProviderState) -> str:
    """A provider's concurrency limit now and what bounds it: ``7/128 (adaptive)``, ``8/8``, ``-``."""
    if p.limit is None:
        return "-"
    bound = str(p.ceiling) if p.ceiling else "-"
    return f"{p.limit}/{bound}" + (" (adaptive)" if p.adaptive else "")


def render(snap: Snapshot, previous: Snapshot | None = None) -> str:
    """The three tables; with ``previous`` (``--watch``), lines/s over the last interval."""
    out: list[str] = []
    live = [p for p in snap.processes if p.live]
    workers = [p for p in live if p.role == "worker"]
    out.append(
        f"sluice status  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.now))}  "
        f"web live: {sum(1 for p in live if p.role == 'web')}  workers live: {len(workers)}  "
        f"finalizers live: {sum(1 for p in live if p.role == 'finalizer')}  "
        f"stale: {sum(1 for p in snap.processes if not p.live)}  "
        f"lines in flight: {sum(p.int('in_flight') for p in workers)}"
    )
    out.append("")
    out.append("PROCESSES")
    rows = []
    for p in sorted(snap.processes, key=lambda p: (p.role, not p.live, p.name)):
        if p.role == "worker":
            in_flight = f"{p.int('in_flight')}/{p.int('concurrency')}"
        elif p.role == "web":
            in_flight = f"{p.int('in_flight')} req"
        else:
            in_flight = "-"
        state = p.fields.get("state", "")
        if p.role == "finalizer":
            n = snap.leased_batches(p.name)
            state += f" ({n} batch{'' if n == 1 else 'es'})"
        rows.append([p.role, p.name, p.host, p.pid, in_flight, state, _age(p.age_s), "LIVE" if p.live else "STALE"])
    out += (
        text_table(["ROLE", "NAME", "HOST", "PID", "IN-FLIGHT", "STATE", "LAST BEAT", "HEALTH"], rows)
        if rows
        else ["  (no process has beaten in the last 10 minutes)"]
    )
    out.append("")
    out.append("BATCHES")
    rows = []
    before = {b.id: b.completed + b.failed for b in previous.batches} if previous else {}
    for b in sorted(snap.batches, key=lambda b: b.id):
        done = b.completed + b.failed
        if previous is not None and b.id in before and snap.now > previous.now:
            rate = (done - before[b.id]) / (snap.now - previous.now)
        elif b.in_progress_at and snap.now > b.in_progress_at:
            rate = done / (snap.now - b.in_progress_at)
        else:
            rate = 0.0
        pct = f"{100 * done / b.total:.0f}%" if b.total else "-"
        status = b.status + (f" ({b.aborting})" if b.aborting else "")
        rows.append(
            [
                b.id,
                b.owner[:8],
                status,
                f"{done}/{b.total}",
                pct,
                str(b.failed),
                str(b.pending),
                b.provider or "-",
                f"{rate:.1f}",
                str(b.undrained),
            ]
        )
    out += (
        text_table(
            ["BATCH", "OWNER", "STATUS", "DONE/TOTAL", "%", "FAILED", "PENDING", "PROVIDER", "LINES/S", "UNWRITTEN"],
            rows,
        )
        if rows
        else ["  (no running batch)"]
    )
    out.append("")
    out.append("PROVIDERS")
    rows = []
    for prov in snap.providers:
        if prov.paused_for_s > 0:
            state = f"paused {prov.paused_for_s:.1f}s"
        elif prov.ramping:
            state = "ramping up"
        else:
            state = "ok"
        cap = str(prov.max_concurrency) if prov.max_concurrency else "-"
        limit = concurrency_limit(prov)
        counts: dict[str, int] = {}
        for k, v in snap.upstream.items():
            kind, _, name = k.partition("|")
            if name == prov.name:
                counts[kind] = counts.get(kind, 0) + v
        rows.append(
            [
                prov.name,
                state,
                str(prov.requests_in_flight),
                f"{prov.leases}/{cap}",
                limit,
                str(counts.get("rate_limited", 0)),
                str(counts.get("retries", 0)),
            ]
        )
    out += (
        text_table(["PROVIDER", "STATE", "IN-FLIGHT", "LEASES/MAX", "LIMIT NOW/MAX", "429s", "RETRIES"], rows)
        if rows
        else ["  (no provider configured here)"]
    )
    lines = snap.lines
    out.append("")
    out.append(
        f"lines recorded since the counters started (exact): completed {lines.get('completed', 0)}, "
        f"failed {lines.get('failed', 0)}"
    )
    return "\n".join(out)


async def run(settings: Settings, *, watch: bool = False) -> int:
    """Print the status once, or every ``WATCH_S`` until interrupted; 1 when Redis does not answer."""
    r = connect(settings, max_connections=4)
    previous: Snapshot | None = None
    try:
        while True:
            try:
                snap = await snapshot(r, settings)
            except REDIS_DOWN as e:
                print(f"sluice: Redis at {settings.redis_url.split('@')[-1]} does not answer: {e}", file=sys.stderr)
                if not watch:
                    return 1
                await asyncio.sleep(WATCH_S)
                continue
            text = render(snap, previous)
            if watch:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                sys.stdout.flush()
                previous = snap
                await asyncio.sleep(WATCH_S)
            else:
                print(text)
                return 0
    finally:
        await r.aclose()
