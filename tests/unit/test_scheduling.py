"""The worker's read scheduling (workers/scheduling.py): shares by token and priority, deadlines first."""

from __future__ import annotations

from collections import Counter

from workers.scheduling import TURN_LINES, Candidate, Deadlines, Scheduler, weight


def _run(scheduler: Scheduler, candidates: list[Candidate], reads: int, *, free: int = 1, now: float = 0.0) -> Counter:
    """``reads`` plans of ``free`` lines each, every planned line really read; lines per batch."""
    got: Counter = Counter()
    for _ in range(reads):
        plan = scheduler.plan(candidates, free, now)
        scheduler.charge(plan, candidates, now)
        got.update(plan)
    return got


def test_weights():
    assert (weight("high"), weight("normal"), weight("low"), weight("")) == (4, 2, 1, 2)


def test_one_tokens_batches_share_4_2_1():
    c = [Candidate("h", "A", 4, 1e9), Candidate("n", "A", 2, 1e9), Candidate("l", "A", 1, 1e9)]
    got = _run(Scheduler(), c, 700)
    assert (got["h"], got["n"], got["l"]) == (400, 200, 100)
    got = _run(Scheduler(), c, 70, free=10)  # several lines per read: the same shares, to within a turn
    assert sum(got.values()) == 700
    assert all(abs(got[b] - want) <= TURN_LINES for b, want in (("h", 400), ("n", 200), ("l", 100))), got


def test_a_read_takes_a_few_batches_a_turn_each():
    # A turn gives a batch several lines, so one read's results reach few batches (one record call each).
    c = [Candidate(f"b{i:02d}", "A", 2, 1e9) for i in range(16)]
    s = Scheduler()
    plan = s.plan(c, 2 * TURN_LINES, 0.0)
    assert len(plan) == 2 and set(plan.values()) == {TURN_LINES}
    s.charge(plan, c, 0.0)
    got = _run(s, c, 63, free=2 * TURN_LINES)
    assert set(got) == {x.batch_id for x in c}  # every batch has its turns, in rotation
    assert max(got.values()) - min(got.values()) <= TURN_LINES, got


def test_tokens_share_equally_whatever_their_priorities():
    c = [Candidate("a1", "A", 4, 1e9), Candidate("a2", "A", 4, 1e9), Candidate("b", "B", 1, 1e9)]
    got = _run(Scheduler(), c, 600)
    assert got["b"] == 300 and got["a1"] == got["a2"] == 150


def test_a_newcomer_starts_level_and_a_dry_batch_yields_its_turns():
    s = Scheduler()
    old = [Candidate("old", "A", 2, 1e9)]
    _run(s, old, 1000)
    both = old + [Candidate("new", "A", 2, 1e9)]
    got = _run(s, both, 100)
    assert got["new"] == got["old"] == 50, "the newcomer got a burst for the time it was not there"
    # A batch whose read came back empty is passed over for a moment; the other gets the turns...
    (empty,) = s.plan(both, 1, 10.0)
    s.charge({}, both, 10.0)
    other = "new" if empty == "old" else "old"
    assert _run(s, both, 20, now=10.05) == Counter({other: 20})
    # ... and the one that had no lines gets no burst to catch up afterwards.
    got = _run(s, both, 100, now=11.0)
    assert abs(got["new"] - got["old"]) <= 2, got


def test_at_risk_batches_go_first_by_deadline_and_leave_a_share():
    c = [
        Candidate("late", "A", 1, 5000.0, urgent=True),
        Candidate("soon", "A", 1, 1000.0, urgent=True),
        Candidate("other", "B", 4, 1e9),
    ]
    got = _run(Scheduler(), c, 1000)
    # 90% to the earliest deadline; the other 10% shared as usual (tokens A and B half each).
    assert got == Counter({"soon": 900 + 25, "other": 50, "late": 25}), got


def test_deadlines_flag_a_batch_that_cannot_finish_in_time():
    d = Deadlines()
    # 1000 lines left, 100 s left: it needs 20 lines/s to be done in half the time left.
    for t in range(6):
        d.observe("slow", 1000.0 + t, 10 * t, 1000 + 10 * t, 1100.0)  # 10 lines/s
        d.observe("fine", 1000.0 + t, 50 * t, 1000 + 50 * t, 1100.0)  # 50 lines/s
    assert d.urgent("slow") and not d.urgent("fine")
    # It stays at risk while it catches up, until it is done or gone.
    d.observe("slow", 1010.0, 900, 1050, 1100.0)
    assert d.urgent("slow")
    d.forget({"fine"})
    assert not d.urgent("slow")


def test_no_judgement_before_enough_is_seen():
    d = Deadlines()
    d.observe("new", 1000.0, 0, 1000, 1010.0)
    d.observe("new", 1001.0, 0, 1000, 1010.0)
    assert not d.urgent("new")
