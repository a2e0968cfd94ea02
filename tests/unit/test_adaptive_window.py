"""The adaptive concurrency window's scripts (workers/limits.py), on fakeredis with Lua.

A provider's window caps the requests in flight at every worker together; these tests drive the
admission and release scripts as the workers do (many holders per call) and check its rules: it
starts small and doubles while full, a burst of 429s cuts it once, it never goes below 1 nor above
its bound, an unused window does not grow, and a re-sent call (a lost reply) changes nothing twice.
"""

from __future__ import annotations

import fakeredis
import pytest

from service.core import keys
from service.core.config import Provider
from workers import limits

P = Provider(name="p", base_url="http://x", adaptive_start=4)  # adaptive by default, no max_concurrency
SLOTS = 128


@pytest.fixture
async def r():
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


async def _admit(r, holders, now, provider=P, op="op"):
    return await limits.admit(
        r, provider, [(h, 1) for h in holders], lease_ms=60_000, op_id=op, slots=SLOTS, now_ms=now
    )


async def _release(r, leases, now, provider=P):
    return await limits.release(r, provider, leases, slots=SLOTS, now_ms=now)


async def _window(r) -> float:
    return float(await r.hget(keys.provider_window("p"), "w"))


async def test_starts_small_and_doubles_while_full(r):
    now = 1_000_000
    first = await _admit(r, [f"h{i}" for i in range(10)], now)
    assert (first.admitted, first.leased, first.window) == (4, True, 4.0), first
    assert first.wait_ms > 0
    # Four answers of a full window: +1 each (slow start), so the next round admits 8.
    assert await _release(r, [(f"h{i}", limits.OK, now) for i in range(4)], now + 100) == 8.0
    second = await _admit(r, [f"h{i}" for i in range(4, 20)], now + 101, op="op2")
    assert second.admitted == 8


async def test_a_burst_of_429s_cuts_once_and_the_floor_is_one(r):
    now = 1_000_000
    await _admit(r, [f"h{i}" for i in range(4)], now)
    await _release(r, [(f"h{i}", limits.OK, now) for i in range(4)], now + 10)  # window 8
    assert (await _admit(r, [f"b{i}" for i in range(8)], now + 20, op="op2")).admitted == 8
    # All eight come back 429 (admitted before any cut): one cut, x0.7 of the 8 in flight.
    window = await _release(r, [(f"b{i}", limits.CONGESTED, now + 20) for i in range(8)], now + 30)
    assert window == pytest.approx(5.6)
    # Requests admitted after that cut that still get 429 cut again, down to 1 and no lower.
    for step in range(10):
        t = now + 100 + 10 * step
        admitted = await _admit(r, ["c"], t, op=f"c{step}")
        assert admitted.admitted == 1
        window = await _release(r, [("c", limits.CONGESTED, t)], t + 1)
    assert window == 1.0
    assert (await _admit(r, ["d"], now + 1000, op="d")).admitted == 1, "progress never stops"


async def test_a_released_lease_counts_once(r):
    now = 1_000_000
    await _admit(r, ["a", "b", "c", "d"], now)
    leases = [(h, limits.OK, now) for h in "abcd"]
    assert await _release(r, leases, now + 5) == 8.0
    # The same release again (redis-py re-sending it after a lost reply): no lease left, no growth.
    assert await _release(r, leases, now + 6) == 8.0
    cut = [("e", limits.CONGESTED, now + 7)]
    await _admit(r, ["e"], now + 7, op="e")
    first = await _release(r, cut, now + 8)
    assert await _release(r, cut, now + 9) == first


async def test_an_admission_sent_twice_takes_its_slots_once(r):
    now = 1_000_000
    holders = [f"h{i}" for i in range(6)]
    once = await _admit(r, holders, now, op="same")
    again = await _admit(r, holders, now, op="same")
    assert once.admitted == again.admitted == 4
    assert await r.zcard(keys.provider_inflight("p")) == 4


async def test_an_unused_window_does_not_grow(r):
    now = 1_000_000
    for i in range(50):  # one request at a time: the window of 4 is never full
        t = now + 10 * i
        await _admit(r, [f"h{i}"], t, op=f"o{i}")
        await _release(r, [(f"h{i}", limits.OK, t)], t + 5)
    assert await _window(r) == 4.0


async def test_bounded_by_max_concurrency(r):
    capped = Provider(name="p", base_url="http://x", max_concurrency=6, adaptive_start=4)
    now = 1_000_000
    for step in range(6):
        t = now + 100 * step
        got = await _admit(r, [f"h{step}-{i}" for i in range(20)], t, provider=capped, op=f"o{step}")
        assert got.admitted <= 6
        await _release(r, [(f"h{step}-{i}", limits.OK, t) for i in range(got.admitted)], t + 50, provider=capped)
    assert await _window(r) == 6.0


async def test_off_means_no_window(r):
    fixed = Provider(name="p", base_url="http://x", adaptive=False, adaptive_start=4)
    got = await _admit(r, [f"h{i}" for i in range(100)], 1_000_000, provider=fixed)
    assert (got.admitted, got.leased, got.window) == (100, False, None)
    assert await r.exists(keys.provider_window("p")) == 0


async def test_after_a_cut_it_climbs_back_fast_to_just_below_the_last_size(r):
    now = 1_000_000
    await r.hset(keys.provider_window("p"), mapping={"w": "20", "ss": "10", "wmax": "0", "cut": "0"})
    got = await _admit(r, [f"h{i}" for i in range(20)], now)
    assert got.admitted == 20
    # A 429 in congestion avoidance: x0.7 of the 20 in flight, then +1 per answer up to 18 (20 - 2).
    assert await _release(r, [("h0", limits.CONGESTED, now)], now + 1) == pytest.approx(14.0)
    assert await _release(r, [(f"h{i}", limits.OK, now) for i in range(1, 5)], now + 2) == pytest.approx(18.0)
    # Then, the window full again, one per window's worth of answers: 14 more answers add less than one.
    assert (await _admit(r, [f"k{i}" for i in range(10)], now + 3, op="more")).admitted == 3
    window = await _release(r, [(f"h{i}", limits.OK, now) for i in range(5, 19)], now + 4)
    assert 18.5 < window < 19.0
