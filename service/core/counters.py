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

import secrets
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from . import keys
from .connections import Pipeline, Redis, Script, run_scripts

# Upper bounds (seconds) of the upstream latency histogram; +Inf is implied.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LE_LABELS = tuple(f"{b:g}" for b in LATENCY_BUCKETS)
INF = "+Inf"

# The history: one hash per minute and shard (keys.history), kept this long.
MINUTE_S = 60
HISTORY_S = 24 * 3600
# A minute's hash lives a little longer than the window, so the oldest minute served is whole.
HISTORY_TTL_S = HISTORY_S + 2 * MINUTE_S
# Readers fold a minute's shard hashes into one (keys.history_total) once it ended this long ago,
# so that 24 h cost 1440 reads, not 1440 x 16. Far past the lost-reply re-sends of the minute's
# last recordings: a late one (a caller paused for longer) is folded by a later read.
FOLD_AFTER_S = 2 * MINUTE_S


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
# counter hashes, 8 the current minute's history hash. ``fresh[k]`` is true when an increment of
# KEYS[k] came back equal to itself: always so for a hash the call created (its every field is new),
# so the caller gives a TTL to such a hash only (a field is new at times in an old hash too: harmless).
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
local fresh = {}
for k, t in pairs(add) do
  for field, n in pairs(t) do
    local by = string.format('%d', n)
    if redis.call('HINCRBY', KEYS[k], field, by) == tonumber(by) then fresh[k] = true end
  end
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


# Folding one shard's minute into the minute's total is an outbox move across two slots: each step
# is one script in one slot and safe to run twice, so a reader killed between them or a reply lost
# and re-sent neither loses nor doubles a count, and readers folding at once do it once.
# 1. On the shard: the minute's hash is renamed to its folding key and marked with an op id (or a
#    fold already under way there is taken over); the counts are returned. A minute with neither
#    hash leaves the shard's index.
# 2. On the total: the counts are added unless the op's marker field ("@<op>") is there.
# 3. On the shard: the folding key of that op goes; the minute leaves the index unless a late
#    recording wrote its hash again (the next fold takes that).
# Fields beginning with "@" are markers, not counts.
_MARK = "@"
_FOLD_TAKE = Script(
    keys=("index", "*hashes"),
    args=("op", "*minutes"),
    source="""
local out = {}
for j = 2, #ARGV do
  local h, f = KEYS[2 * j - 2], KEYS[2 * j - 1]
  if redis.call('EXISTS', f) == 0 and redis.call('EXISTS', h) == 1 then
    redis.call('RENAME', h, f)
    redis.call('HSET', f, '@op', ARGV.op)
  end
  local counts = redis.call('HGETALL', f)
  if #counts > 0 then
    out[#out + 1] = {ARGV[j], counts}
  else
    redis.call('ZREM', KEYS.index, ARGV[j])
  end
end
return out
""",
)
# parts: per fold, its op, its number of fields, then field, count pairs.
_FOLD_PUT = Script(
    keys=("total",),
    args=("expire_at", "*parts"),
    source="""
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  if redis.call('HSETNX', KEYS.total, '@' .. ARGV[i], 1) == 1 then
    for k = i + 2, i + 2 * n, 2 do redis.call('HINCRBY', KEYS.total, ARGV[k], ARGV[k + 1]) end
  end
  i = i + 2 + 2 * n
end
redis.call('EXPIREAT', KEYS.total, ARGV.expire_at)
return 1
""",
)
# parts: per minute, the minute and the op that folded it.
_FOLD_DONE = Script(
    keys=("index", "*hashes"),
    args=("*parts",),
    source="""
for j = 1, #ARGV, 2 do
  local h, f = KEYS[j + 1], KEYS[j + 2]
  if redis.call('HGET', f, '@op') == ARGV[j + 1] then redis.call('DEL', f) end
  if redis.call('EXISTS', h) == 0 and redis.call('EXISTS', f) == 0 then
    redis.call('ZREM', KEYS.index, ARGV[j])
  end
end
return 1
""",
)
_FOLD_SCRIPTS = (_FOLD_TAKE, _FOLD_PUT, _FOLD_DONE)
# Minutes per call of the shard steps: a day unfolded is many short scripts, not one long stall of Redis.
_FOLD_CHUNK = 60


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _pairs(minutes: list[int], shard: int) -> list[str]:
    out: list[str] = []
    for m in minutes:
        out += [keys.history(shard, m), keys.history_folding(shard, m)]
    return out


async def _execute(r: Redis, build: Callable[[Pipeline], None]) -> list[Any]:
    # Every fold step is safe to run twice (run_scripts may send them again).
    return await run_scripts(r, build, _FOLD_SCRIPTS)


async def fold_history(r: Redis, *, now: float, since: float = 0) -> int:
    """Fold every shard's minutes from ``since`` that ended at least ``FOLD_AFTER_S`` before
    ``now`` into the minutes' totals (``keys.history_total``); return how many shard minutes were
    folded.

    Exact and idempotent (see the fold scripts above): any process may run it at any time, any
    number of times at once. ``read_history`` runs it first over its window; a periodic caller
    keeps the first read after a long quiet spell cheap.
    """
    horizon = now - MINUTE_S - FOLD_AFTER_S

    def due(pipe: Pipeline) -> None:
        for s in range(keys.SHARDS):
            pipe.zrangebyscore(keys.history_index(s), since, horizon)

    todo: dict[int, list[int]] = {}
    for s, listed in enumerate(await _execute(r, due)):
        ms = [int(_s(m)) for m in listed]
        if ms:
            todo[s] = ms
    if not todo:
        return 0
    op = secrets.token_hex(6)

    def take(pipe: Pipeline) -> None:
        for s, ms in todo.items():
            for i in range(0, len(ms), _FOLD_CHUNK):
                chunk = ms[i : i + _FOLD_CHUNK]
                _FOLD_TAKE.queue(
                    pipe, index=keys.history_index(s), hashes=_pairs(chunk, s), op=f"{s}.{op}", minutes=chunk
                )

    parts: dict[int, list[str | int]] = {}
    taken: dict[int, list[tuple[int, str]]] = {}
    calls = [s for s, ms in todo.items() for _ in range(0, len(ms), _FOLD_CHUNK)]
    for s, replies in zip(calls, await _execute(r, take)):
        for minute, counts in replies:
            m, fields = int(_s(minute)), [_s(x) for x in counts]
            pairs = dict(zip(fields[::2], fields[1::2]))
            fold_op = pairs.pop("@op", "")
            parts.setdefault(m, []).extend([fold_op, len(pairs), *(x for kv in pairs.items() for x in kv)])
            taken.setdefault(s, []).append((m, fold_op))

    def put(pipe: Pipeline) -> None:
        for m, p in parts.items():
            _FOLD_PUT.queue(pipe, total=keys.history_total(m), expire_at=m + HISTORY_TTL_S, parts=p)

    def clear(pipe: Pipeline) -> None:
        for s, folds in taken.items():
            for i in range(0, len(folds), _FOLD_CHUNK):
                chunk = folds[i : i + _FOLD_CHUNK]
                _FOLD_DONE.queue(
                    pipe,
                    index=keys.history_index(s),
                    hashes=_pairs([m for m, _ in chunk], s),
                    parts=[x for fold in chunk for x in fold],
                )

    await _execute(r, put)
    await _execute(r, clear)
    return sum(len(folds) for folds in taken.values())


def _counts(h: dict[Any, Any]) -> dict[str, int]:
    fields: dict[str, int] = {}
    for k, v in h.items():
        name = _s(k)
        if name.startswith(_MARK):
            continue
        try:
            fields[name] = int(v)
        except ValueError:
            continue
    return fields


def _add(into: dict[str, int], fields: dict[str, int]) -> None:
    for k, v in fields.items():
        into[k] = into.get(k, 0) + v


async def read_history(
    r: Redis,
    *,
    now: float,
    minutes: int,
    providers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The last ``minutes`` minutes of the history (the current, partial one last), as the JSON
    ``GET /v1/sluice/history`` serves: one array per series, aligned with ``minutes``.

    Past minutes are folded first (``fold_history``) and read as one hash each; the last few
    minutes are summed over the shards. ``providers`` (the configured ones) are listed even
    without data; any other provider with data in the window is listed too (one removed from the
    configuration keeps its past).
    """
    end = minute_of(now)
    starts = [end - MINUTE_S * i for i in range(minutes - 1, -1, -1)]
    await fold_history(r, now=now, since=starts[0])
    horizon = now - MINUTE_S - FOLD_AFTER_S
    recent = [m for m in starts if m > horizon]
    pipe = r.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(keys.history_total(start))
    for m in recent:
        for s in range(keys.SHARDS):
            pipe.hgetall(keys.history(s, m))
            pipe.hgetall(keys.history_folding(s, m))
    replies = iter(await pipe.execute())
    totals = [next(replies) for _ in starts]
    decoded = [_counts(h) for h in totals]
    for m in recent:
        i = starts.index(m)
        folded = {_s(k) for k in totals[i] if _s(k).startswith(_MARK)}
        for _ in range(keys.SHARDS):
            _add(decoded[i], _counts(next(replies)))
            folding = {_s(k): v for k, v in next(replies).items()}
            # A fold of this minute under way (by a reader whose clock runs ahead): counted once.
            if folding and _MARK + _s(folding.get("@op", "")) not in folded:
                _add(decoded[i], _counts(folding))
    seen = {f.split("|", 1)[0] for fields in decoded for f in fields if "|" in f}
    return {
        "object": "sluice.history",
        "minute_s": MINUTE_S,
        "now": now,
        "minutes": starts,
        "total": _series(decoded, None),
        "providers": {p: _series(decoded, p) for p in sorted(set(providers) | seen)},
    }
