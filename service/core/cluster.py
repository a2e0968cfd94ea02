"""The cluster's state in one snapshot of Redis: what ``GET /metrics`` (service/web/metrics.py),
the dashboard's cluster view and ``sluice status`` (service/cli/status.py) show.

Nothing here is process-local: counters are the cluster totals that the script recording each
result moves exactly once (``service/core/counters.py``), and gauges are read from the cluster's
state (heartbeats of every web, worker and finalizer process, live batches, their streams,
provider pauses, leases and adaptive
concurrency windows) at scrape time, in two pipelined round trips whatever the number of
batches. Any web process answers for the
whole cluster, so scrape one of them (or all: they agree).

Label cardinality stays bounded: ``provider`` comes from the configuration, ``status`` is an
HTTP status or ``timeout``/``connection_error``/``aborted``, ``process`` names only processes
that beat in the last ``PRUNE_AFTER_S``, and ``batch_id`` only batches still running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import keys
from .config import RAMP_S, Settings, route
from .heartbeat import STALE_AFTER_S
from .leases import holder_of
from .records import BatchField, BatchRecord
from .store import Redis
from .wire import TERMINAL_STATUSES


@dataclass
class ProcessState:
    """One web, worker or finalizer process, as its last heartbeat described it."""

    name: str
    role: str
    host: str
    pid: str
    started_at: float
    age_s: float  # since its last beat, by Redis's clock
    fields: dict[str, str]

    @property
    def live(self) -> bool:
        return self.age_s <= STALE_AFTER_S

    def int(self, name: str) -> int:
        try:
            return int(float(self.fields.get(name) or 0))
        except ValueError:
            return 0


@dataclass
class BatchState:
    """A batch between validation and its terminal state."""

    id: str
    owner: str
    status: str
    total: int
    completed: int
    failed: int
    provider: str  # the provider its lines go to ("" when it cannot be told)
    in_progress_at: int
    aborting: str
    pending: int  # lines handed to a worker and not acknowledged (XPENDING)
    undrained: int  # results recorded that the finalizer has not written yet
    oldest_undrained_s: float
    finalizer: str = ""  # the finalizer holding the batch's lease ("" when none does)

    @property
    def waiting(self) -> int:
        return max(0, self.total - self.completed - self.failed) if self.status != "validating" else 0


@dataclass
class ProviderState:
    """A configured provider's shared state in Redis."""

    name: str
    paused_for_s: float
    ramping: bool
    leases: int
    max_concurrency: int | None
    requests_in_flight: int  # summed over live workers' heartbeats
    adaptive: bool = False
    window: float | None = None  # the adaptive window (workers/limits.py); None when adaptive concurrency is off
    ceiling: int | None = None  # what bounds the window: max_concurrency, else the live workers' slots

    @property
    def limit(self) -> int | None:
        """The concurrency limit every worker follows now (None: none)."""
        if self.adaptive and self.window is not None:
            return max(1, int(self.window))
        return self.max_concurrency


@dataclass
class Snapshot:
    """Everything ``/metrics`` and ``sluice status`` show, read at one moment (Redis time ``now``)."""

    now: float
    processes: list[ProcessState] = field(default_factory=list)
    batches: list[BatchState] = field(default_factory=list)
    providers: list[ProviderState] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    upstream: dict[str, int] = field(default_factory=dict)
    latency: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # "<provider>|<model>|<kind>" -> count

    def leased_batches(self, name: str) -> int:
        """How many live batches the finalizer ``name`` holds the lease of."""
        return sum(1 for b in self.batches if b.finalizer == name)

    @property
    def unleased_batches(self) -> int:
        """Live batches no finalizer holds (none at work, or their leases just expired)."""
        return sum(1 for b in self.batches if not b.finalizer)


def _s(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def as_int(v: bytes | str | int | None) -> int:
    """A counter read from Redis as an int (0 for anything unreadable)."""
    try:
        return int(float(_s(v) or 0)) if not isinstance(v, int) else v
    except ValueError:
        return 0


# The counter hashes, one of each per shard (keys.metrics_*): the snapshot sums them.
_COUNTERS = (keys.metrics_lines, keys.metrics_upstream, keys.metrics_latency, keys.metrics_tokens)


def _summed(hashes: list[dict[bytes, bytes]]) -> dict[str, int | float]:
    """Field by field sums of the shards' hashes of one counter (a latency sum in seconds is a float)."""
    out: dict[str, int | float] = {}
    for h in hashes:
        for k, v in h.items():
            raw = _s(v)
            try:
                n: int | float = int(raw)
            except ValueError:
                try:
                    n = float(raw)
                except ValueError:
                    continue
            name = _s(k)
            out[name] = out.get(name, 0) + n
    return out


_F = BatchField
_BATCH_FIELDS = (
    _F.OWNER,
    _F.STATUS,
    _F.TOTAL,
    _F.COMPLETED,
    _F.FAILED,
    _F.PROVIDER,
    _F.MODEL,
    _F.IN_PROGRESS_AT,
    _F.ABORT,
)


async def snapshot(r: Redis, settings: Settings) -> Snapshot:
    """Read the cluster's state in two pipelined round trips."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.PROCESSES, 0, -1, withscores=True)
    for shard in range(keys.SHARDS):
        pipe.smembers(keys.live_batches(shard))
    for shard in range(keys.SHARDS):
        for counter in _COUNTERS:
            pipe.hgetall(counter(shard))
    (sec, usec), procs, *rest = await pipe.execute()
    live, counters = rest[: keys.SHARDS], rest[keys.SHARDS :]
    now = sec + usec / 1e6
    now_ms = int(now * 1000)
    names = [(_s(n), float(score)) for n, score in procs]
    batch_ids = sorted({_s(b) for members in live for b in members})

    pipe = r.pipeline(transaction=False)
    for name, _ in names:
        pipe.hgetall(keys.process(name))
    for b in batch_ids:
        pipe.hmget(keys.batch(b), *_BATCH_FIELDS)
        pipe.xpending(keys.lines(b), keys.WORKER_GROUP)
        pipe.xlen(keys.results(b))
        pipe.xrange(keys.results(b), count=1)
        pipe.get(keys.finalizer(b))
    for p in settings.providers:
        pipe.get(keys.provider_pause(p.name))
        pipe.zcount(keys.provider_inflight(p.name), now_ms, "+inf")
        pipe.hget(keys.provider_window(p.name), "w")
    replies = iter(await pipe.execute(raise_on_error=False))

    snap = Snapshot(now=now)
    for name, seen in names:
        h = next(replies)
        if not isinstance(h, dict) or not h:
            continue  # expired: the zset entry goes with the next heartbeat's prune
        f = {_s(k): _s(v) for k, v in h.items()}
        snap.processes.append(
            ProcessState(
                name=name,
                role=f.get("role", "?"),
                host=f.get("host", ""),
                pid=f.get("pid", ""),
                started_at=float(f.get("started_at") or 0),
                age_s=max(0.0, now - seen),
                fields=f,
            )
        )
    for b in batch_ids:
        values, pending, undrained, first, lease = (
            next(replies),
            next(replies),
            next(replies),
            next(replies),
            next(replies),
        )
        if isinstance(values, Exception) or not values or values[1] is None or _s(values[1]) in TERMINAL_STATUSES:
            continue  # gone, or ended and about to leave the live set
        h = BatchRecord.from_values(_BATCH_FIELDS, values)
        provider = h.provider
        if not provider and h.model:
            chosen = route(settings.providers, h.model)
            provider = chosen.name if chosen else ""
        oldest = 0.0
        if isinstance(first, list) and first:
            oldest = max(0.0, now - int(_s(first[0][0]).split("-")[0]) / 1000)
        snap.batches.append(
            BatchState(
                id=b,
                owner=h.owner,
                status=h.status or "",
                total=h.total,
                completed=h.completed,
                failed=h.failed,
                provider=provider,
                in_progress_at=h.in_progress_at or 0,
                aborting=h.abort,
                pending=pending["pending"] if isinstance(pending, dict) else 0,
                undrained=undrained if isinstance(undrained, int) else 0,
                oldest_undrained_s=oldest,
                finalizer=holder_of(lease) if isinstance(lease, (bytes, str)) else "",
            )
        )
    live_workers = [p for p in snap.processes if p.live and p.role == "worker"]
    slots = sum(w.int("concurrency") for w in live_workers)
    for p in settings.providers:
        pause, leases, window = next(replies), next(replies), next(replies)
        pause_end = as_int(pause) if not isinstance(pause, Exception) else 0
        ceiling = p.max_concurrency or slots or None
        win: float | None = None
        if p.is_adaptive:
            try:
                win = float(_s(window)) if isinstance(window, bytes) else float(p.adaptive_start)
            except ValueError:
                win = float(p.adaptive_start)
            win = max(1.0, min(win, ceiling)) if ceiling else win  # as the workers read it
        snap.providers.append(
            ProviderState(
                name=p.name,
                paused_for_s=max(0.0, (pause_end - now_ms) / 1000),
                ramping=bool(pause_end) and 0 <= now_ms - pause_end < RAMP_S * 1000,
                leases=leases if isinstance(leases, int) else 0,
                max_concurrency=p.max_concurrency,
                requests_in_flight=sum(w.int(f"requests:{p.name}") for w in live_workers),
                adaptive=p.is_adaptive,
                window=win,
                ceiling=ceiling,
            )
        )
    lines, upstream, latency, tokens = (_summed(counters[i :: len(_COUNTERS)]) for i in range(len(_COUNTERS)))
    snap.lines = {k: int(v) for k, v in lines.items()}
    snap.upstream = {k: int(v) for k, v in upstream.items()}
    snap.latency = {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in latency.items()}
    snap.tokens = {k: int(v) for k, v in tokens.items()}
    return snap
