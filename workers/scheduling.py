"""Which running batches a worker reads its next lines from: priorities, fairness and deadlines.

A worker reads a line only when it has a free slot, so when the provider is the bottleneck the
order of its reads is the order in which batches get the provider. Each worker decides on its
own (no shared state: every worker applying the same rule gives the same shares overall), by
stride scheduling, a turn of up to ``TURN_LINES`` lines at a time (shares are counted by the line):

- **Tokens share equally.** Among the tokens with a running batch, the next line goes to the one
  that has had the fewest lines so far (in a virtual time that starts a newcomer level with the
  others, so nobody gets a burst for having been away). Marking batches ``high`` does not give a
  token more than its equal share.
- **Within a token, batches share by priority weight**: ``high`` 4, ``normal`` 2, ``low`` 1. Three
  batches of one token, high, normal and low, get 4/7, 2/7 and 1/7 of that token's lines; a low
  batch always progresses.
- **Deadlines.** A batch is *at risk* when, at its recent completion rate (measured over
  ``RATE_WINDOW_S`` from its counters, cluster-wide), its remaining lines would not be done within
  ``RISK_FRACTION`` of the time left before its ``expires_at``. At-risk batches take up to
  ``URGENT_SHARE`` of the reads, earliest deadline first, before token fairness and priorities
  share the rest. A batch stays at risk until it is done: letting it go as soon as it is ahead
  would have it hover just above what it needs and finish at the last moment.

A batch whose stream gave fewer lines than asked (all of its lines are in flight, or the feeder
has not topped it up yet) is passed over for ``DRY_S``, so its turns go to batches that have lines.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

PRIORITY_WEIGHTS = {"high": 4, "normal": 2, "low": 1}
DEFAULT_PRIORITY = "normal"
# Share of a worker's reads that at-risk batches may take.
URGENT_SHARE = 0.9
# A batch at risk aims to be done within this fraction of the time it has left.
RISK_FRACTION = 0.5
# A batch's completion rate is measured over this long, and judged only once this much is seen.
RATE_WINDOW_S = 5.0
RATE_MIN_SPAN_S = 2.0
DRY_S = 0.2
# Lines a turn gives a batch. The lines of one read finish about together and are recorded with one
# script call per batch, whose counter updates (about 25 Redis calls) cost the same for one line as
# for many: a line per turn spreads a read over as many batches as it has lines, and with 16 batches
# running a call carried ~1.4 lines (bench spread: 28 Redis calls a line, 11 with one batch; turns of
# 4 lines: 18, of 8: 15). 8 is what a worker of the default concurrency (32) reads at least at once.
TURN_LINES = 8

_URGENT, _FAIR = "urgent", "fair"


def weight(priority: str) -> int:
    """The share weight of a priority (unknown values weigh as ``normal``)."""
    return PRIORITY_WEIGHTS.get(priority, PRIORITY_WEIGHTS[DEFAULT_PRIORITY])


@dataclass(frozen=True)
class Candidate:
    """A running batch a worker may read lines from."""

    batch_id: str
    owner: str
    weight: int
    deadline: float  # its expires_at (Unix s)
    urgent: bool = False


class Scheduler:
    """Plans which batches the next reads come from (see the module docstring)."""

    def __init__(self) -> None:
        self.owner_pass: dict[str, float] = {}
        self.batch_pass: dict[str, float] = {}
        self.lane_pass = {_URGENT: 0.0, _FAIR: 0.0}
        self.live_before: set[str] = set()
        self.urgent_before = False
        self.dry_until: dict[str, float] = {}
        self.planned: dict[str, tuple[int, int]] = {}  # batch -> (urgent reads, fair reads) of the last plan

    def plan(self, candidates: list[Candidate], free: int, now: float) -> dict[str, int]:
        """How many lines to read from which batch, ``free`` in all (fewer batches than lines is fine)."""
        if not candidates or free <= 0:
            self.planned = {}
            return {}
        known = {c.batch_id for c in candidates}
        for table in (self.batch_pass, self.dry_until):
            for gone in set(table) - known:
                del table[gone]
        for gone in set(self.owner_pass) - {c.owner for c in candidates}:
            del self.owner_pass[gone]
        live = [c for c in candidates if self.dry_until.get(c.batch_id, 0.0) <= now]
        if not live:
            # Every stream looked empty a moment ago: ask all of them once (a blocking read sees new lines).
            order = sorted(candidates, key=lambda c: (self.batch_pass.get(c.batch_id, 0.0), c.batch_id))[:free]
            self.planned = {c.batch_id: (0, 1) for c in order}
            return {c.batch_id: 1 for c in order}
        self._enter(live)
        owner_pass, batch_pass, lane_pass = dict(self.owner_pass), dict(self.batch_pass), dict(self.lane_pass)
        urgent = sorted((c for c in live if c.urgent), key=lambda c: (c.deadline, c.batch_id))
        by_owner: dict[str, list[Candidate]] = {}
        for c in live:
            by_owner.setdefault(c.owner, []).append(c)
        counts: dict[str, list[int]] = {}
        left = free
        while left > 0:
            n = min(TURN_LINES, left)
            if urgent and lane_pass[_URGENT] <= lane_pass[_FAIR]:
                chosen, lane = urgent[0], 0
                lane_pass[_URGENT] += n / (URGENT_SHARE * 10)
            else:
                owner = min(by_owner, key=lambda o: (owner_pass[o], o))
                chosen = min(by_owner[owner], key=lambda c: (batch_pass[c.batch_id], c.batch_id))
                owner_pass[owner] += n
                batch_pass[chosen.batch_id] += n / chosen.weight
                if urgent:
                    lane_pass[_FAIR] += n / ((1 - URGENT_SHARE) * 10)
                lane = 1
            counts.setdefault(chosen.batch_id, [0, 0])[lane] += n
            left -= n
        self.planned = {b: (u, f) for b, (u, f) in counts.items()}
        return {b: u + f for b, (u, f) in counts.items()}

    def charge(self, got: dict[str, int], candidates: list[Candidate], now: float) -> None:
        """Account the lines the last plan's reads really gave (``got``: batch -> lines)."""
        by_id = {c.batch_id: c for c in candidates}
        for batch_id, (urgent, fair) in self.planned.items():
            n = got.get(batch_id, 0)
            if n < urgent + fair:
                self.dry_until[batch_id] = now + DRY_S
            c = by_id.get(batch_id)
            if c is None or n == 0:
                continue
            from_urgent = min(n, urgent)
            from_fair = n - from_urgent
            if from_urgent:
                self.lane_pass[_URGENT] += from_urgent / (URGENT_SHARE * 10)
            if from_fair:
                if self.urgent_before:
                    self.lane_pass[_FAIR] += from_fair / ((1 - URGENT_SHARE) * 10)
                self.owner_pass[c.owner] = self.owner_pass.get(c.owner, 0.0) + from_fair
                self.batch_pass[batch_id] = self.batch_pass.get(batch_id, 0.0) + from_fair / c.weight
        self.planned = {}

    def _enter(self, live: list[Candidate]) -> None:
        """Start newcomers (and batches back from a dry spell) level with those already reading.

        A pass is never lowered: a batch that had more than its share keeps that debt.
        """
        staying = [c for c in live if c.batch_id in self.live_before]
        owners_staying = {c.owner for c in staying}
        owner_vt = min((self.owner_pass.get(o, 0.0) for o in owners_staying), default=None)
        for owner in {c.owner for c in live} - owners_staying:
            base = owner_vt if owner_vt is not None else min(self.owner_pass.values(), default=0.0)
            self.owner_pass[owner] = max(self.owner_pass.get(owner, base), base)
        for c in live:
            if c.batch_id in self.live_before:
                continue
            peers = [self.batch_pass.get(p.batch_id, 0.0) for p in staying if p.owner == c.owner]
            base = (
                min(peers)
                if peers
                else min(
                    (
                        self.batch_pass.get(p.batch_id, 0.0)
                        for p in live
                        if p.owner == c.owner and p.batch_id in self.batch_pass
                    ),
                    default=0.0,
                )
            )
            self.batch_pass[c.batch_id] = max(self.batch_pass.get(c.batch_id, base), base)
        urgent_now = any(c.urgent for c in live)
        if urgent_now and not self.urgent_before:
            # The urgent lane starts level with the fair one: no credit for the time nothing was at risk.
            self.lane_pass[_URGENT] = max(self.lane_pass[_URGENT], self.lane_pass[_FAIR])
        self.urgent_before = urgent_now
        self.live_before = {c.batch_id for c in live}


class Deadlines:
    """Which running batches are at risk of missing their deadline (see the module docstring)."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[tuple[float, int]]] = {}
        self.at_risk: set[str] = set()

    def observe(self, batch_id: str, now: float, done: int, total: int, expires_at: float) -> None:
        """Note a batch's progress (lines with a result, of ``total``) at ``now`` (Unix s)."""
        samples = self.samples.setdefault(batch_id, deque())
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        left, time_left = total - done, expires_at - now
        if left <= 0 or time_left <= 0 or total <= 0:
            self.at_risk.discard(batch_id)  # done, or past saving: the finalizer expires it
            return
        span = now - samples[0][0]
        if span < RATE_MIN_SPAN_S:
            return
        rate = (done - samples[0][1]) / span
        if rate < left / (RISK_FRACTION * time_left):
            self.at_risk.add(batch_id)

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of batches not in ``keep`` (they ended)."""
        for batch_id in set(self.samples) - keep:
            del self.samples[batch_id]
        self.at_risk &= keep

    def urgent(self, batch_id: str) -> bool:
        return batch_id in self.at_risk
