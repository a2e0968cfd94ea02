"""Exact cluster counters and their per-minute history, moved by the script that records a result.

A line's result is recorded exactly once (``store.record_results``: the done bitmap), and the same
atomic script step adds that line to every cluster counter: lines by outcome, and the line's
upstream attempts (requests by provider and status, their latency histogram, retries, 429s, the
provider pauses they caused), plus the current minute of the history. So a SIGKILL can neither
lose a count nor double one, and a redelivered line counts once.

"Exact" for upstream requests means: the attempts made by the worker whose result was recorded.
Attempts of a line whose worker died (or was stopped, or lost its lease) before recording are not
counted; the line's next delivery counts its own attempts.

A line's attempts travel to the script as two strings (see :meth:`Attempts.encode`):

* a *shape*: ``"<outcome>\\t<provider>\\t<status>:<le>[:p]\\t..."``, one ``status:le`` token per
  attempt (``le`` the histogram bucket of its latency, ``:p`` when it paused the provider). Most
  lines of a call share a shape, so the script counts shapes per line (a table increment) and
  expands each distinct shape into counter fields once per call;
* the attempts' latencies in whole microseconds, comma-separated, summed per shape position.

A line with no provider (never sent: aborted, poison, provider not configured) has the shape
``"<outcome>\\t"`` and moves only the line counters.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from . import keys
from .connections import Redis

# Upper bounds (seconds) of the upstream latency histogram; +Inf is implied.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LE_LABELS = tuple(f"{b:g}" for b in LATENCY_BUCKETS)
INF = "+Inf"

# The history: one hash per minute (keys.history), kept this long.
MINUTE_S = 60
HISTORY_S = 24 * 3600
# A minute's hash lives a little longer than the window, so the oldest minute served is whole.
HISTORY_TTL_S = HISTORY_S + 2 * MINUTE_S


def minute_of(unix_s: float) -> int:
    """The start (unix seconds) of the minute holding ``unix_s``."""
    return int(unix_s) // MINUTE_S * MINUTE_S


def le_label(seconds: float) -> str:
    """The histogram bucket (its upper bound's label) of a latency."""
    i = bisect_left(LATENCY_BUCKETS, seconds)
    return LE_LABELS[i] if i < len(LE_LABELS) else INF


class Attempts:
    """The upstream attempts one line made, as the worker saw them; recorded with its result.

    ``ends_ns`` (the wall-clock end of each attempt) is kept only when ``timed`` (tracing).
    """

    __slots__ = ("provider", "tries", "micros", "ends_ns", "timed")

    def __init__(self, provider: str = "", *, timed: bool = False) -> None:
        self.provider = provider
        self.tries: list[str] = []
        self.micros: list[int] = []
        self.timed = timed
        self.ends_ns: list[int] = []

    def add(self, status: str, seconds: float, end_ns: int = 0) -> None:
        """One attempt answered with ``status`` (an HTTP status, ``timeout``, ...) after ``seconds``."""
        self.tries.append(f"{status}:{le_label(seconds)}")
        self.micros.append(round(seconds * 1_000_000))
        if self.timed:
            self.ends_ns.append(end_ns)

    def paused(self) -> None:
        """The last attempt (a 429) paused its provider for every worker."""
        self.tries[-1] += ":p"

    def encode(self, outcome: str) -> tuple[str, str]:
        """``(shape, micros)``: the two arguments the recording script takes for this line."""
        if not self.provider or not self.tries:
            return unsent(outcome)
        micros = self.micros
        return (
            "\t".join((outcome, self.provider, *self.tries)),
            str(micros[0]) if len(micros) == 1 else ",".join(map(str, micros)),
        )


def unsent(outcome: str) -> tuple[str, str]:
    """``(shape, micros)`` of a line recorded without any upstream attempt."""
    return outcome + "\t", ""


# The part of the recording script (store._RECORD) that expands the shapes counted for the lines
# newly recorded (``shapes``: shape -> lines, ``sums``: shape -> latency sums per attempt) into
# HINCRBYs: one per distinct field and call. KEYS: 3 batch hash, 5 lines, 6 upstream, 7 latency
# counter hashes, 8 the current minute's history hash.
LUA_EXPAND = """
local add = {[3] = {}, [5] = {}, [6] = {}, [7] = {}, [8] = {}}
local function bump(k, field, n)
  local t = add[k]
  t[field] = (t[field] or 0) + n
end
for shape, n in pairs(shapes) do
  local tab = string.find(shape, '\\t', 1, true)
  local outcome = string.sub(shape, 1, tab - 1)
  bump(3, outcome, n)
  bump(5, outcome, n)
  bump(8, outcome, n)
  local rest = string.sub(shape, tab + 1)
  local tab2 = string.find(rest, '\\t', 1, true)
  local provider = tab2 and string.sub(rest, 1, tab2 - 1) or rest
  if provider ~= '' and tab2 then
    bump(8, provider .. '|' .. outcome, n)
    local s = sums[shape]
    local k = 0
    for status, le, flag in string.gmatch(string.sub(rest, tab2 + 1), '([^:\\t]+):([^:\\t]+):?([^\\t]*)') do
      k = k + 1
      local us = s[k] or 0
      local base = provider .. '|' .. status .. '|'
      bump(7, base .. 'count', n)
      bump(7, base .. 'sum_us', us)
      if le ~= '+Inf' then bump(7, base .. le, n) end
      bump(8, provider .. '|requests', n)
      bump(8, provider .. '|sum_us', us)
      bump(8, provider .. '|le|' .. le, n)
      if status == '429' then
        bump(6, 'rate_limited|' .. provider, n)
        bump(8, provider .. '|429', n)
      end
      if flag == 'p' then bump(6, 'pauses|' .. provider, n) end
    end
    if k > 1 then bump(6, 'retries|' .. provider, n * (k - 1)) end
  end
end
for k, t in pairs(add) do
  for field, n in pairs(t) do redis.call('HINCRBY', KEYS[k], field, string.format('%d', n)) end
end
"""


# ----------------------------------------------------------------------------- reading the history
SERIES = ("completed", "failed", "requests", "rate_limited", "latency_mean_s", "latency_p50_s")


def p50(buckets: dict[str, int]) -> float | None:
    """The median of a latency histogram (non-cumulative counts by bucket label), interpolated
    linearly inside its bucket as Prometheus's ``histogram_quantile`` does; None when empty."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = total / 2
    running, lower = 0, 0.0
    for bound, label in zip(LATENCY_BUCKETS, LE_LABELS):
        n = buckets.get(label, 0)
        if n and running + n >= rank:
            return lower + (bound - lower) * (rank - running) / n
        running += n
        lower = bound
    return LATENCY_BUCKETS[-1]  # in the +Inf bucket: its lower bound is all that is known


def _sum(fields: dict[str, int], providers: list[str], suffix: str) -> int:
    return sum(fields.get(f"{p}|{suffix}", 0) for p in providers)


def _series(minutes: list[dict[str, int]], provider: str | None) -> dict[str, list[int | float | None]]:
    """The per-minute series of one provider (or, for None, of the whole cluster)."""
    out: dict[str, list[int | float | None]] = {name: [] for name in SERIES}
    for fields in minutes:
        if provider is None:
            names = sorted({f.split("|", 1)[0] for f in fields if "|" in f})
            # Lines never sent to a provider count in the totals only.
            completed, failed = fields.get("completed", 0), fields.get("failed", 0)
        else:
            names = [provider]
            completed, failed = _sum(fields, names, "completed"), _sum(fields, names, "failed")
        requests = _sum(fields, names, "requests")
        out["completed"].append(completed)
        out["failed"].append(failed)
        out["requests"].append(requests)
        out["rate_limited"].append(_sum(fields, names, "429"))
        out["latency_mean_s"].append(round(_sum(fields, names, "sum_us") / requests / 1e6, 6) if requests else None)
        median = p50({label: _sum(fields, names, f"le|{label}") for label in (*LE_LABELS, INF)})
        out["latency_p50_s"].append(round(median, 6) if median is not None else None)
    return out


async def read_history(
    r: Redis,
    *,
    now: float,
    minutes: int,
    providers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The last ``minutes`` minutes of the history (the current, partial one last), as the JSON
    ``GET /v1/sluice/history`` serves: one array per series, aligned with ``minutes``.

    ``providers`` (the configured ones) are listed even without data; any other provider with
    data in the window is listed too (one removed from the configuration keeps its past).
    """
    end = minute_of(now)
    starts = [end - MINUTE_S * i for i in range(minutes - 1, -1, -1)]
    pipe = r.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(keys.history(start))
    decoded = []
    for h in await pipe.execute():
        fields: dict[str, int] = {}
        for k, v in h.items():
            try:
                fields[k.decode()] = int(v)
            except ValueError:
                continue
        decoded.append(fields)
    seen = {f.split("|", 1)[0] for fields in decoded for f in fields if "|" in f}
    return {
        "object": "sluice.history",
        "minute_s": MINUTE_S,
        "now": now,
        "minutes": starts,
        "total": _series(decoded, None),
        "providers": {p: _series(decoded, p) for p in sorted(set(providers) | seen)},
    }
