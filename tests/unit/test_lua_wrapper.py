"""The typed Lua wrapper (service/core/connections.py Script, service/core/leases.py FencedScript).

Scripts declare the names of their KEYS and ARGV; a call passes exactly those names as keywords.
These tests run the scripts on fakeredis's Lua (lupa).
"""

from __future__ import annotations

import fakeredis
import pytest
from redis.exceptions import NoScriptError, ResponseError

from service.core import leases
from service.core.connections import Script
from service.core.leases import FencedScript, LeaseLost

# Answers what the body sees: the named slots, and the variadic tails by index.
_ECHO = Script(
    keys=("first", "second", "*rest"),
    args=("a", "b", "*tail"),
    source="""
local rest, tail = {}, {}
for i = 3, #KEYS do rest[#rest + 1] = KEYS[i] end
for i = 3, #ARGV do tail[#tail + 1] = ARGV[i] end
return {KEYS.first, KEYS.second, ARGV.a, ARGV.b, rest, tail, #KEYS, #ARGV}
""",
)

_SET = Script(
    keys=("target",),
    args=("value",),
    source="""
return redis.call('SET', KEYS.target, ARGV.value)
""",
)

_FENCED_SET = FencedScript(
    keys=("target",),
    args=("value", "*more"),
    source="""
redis.call('SET', KEYS.target, ARGV.value)
return #ARGV
""",
)


@pytest.fixture
async def r():
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


async def test_keywords_fill_their_slots_whatever_their_order(r):
    got = await _ECHO(r, tail=["t1", "t2"], b=2, second="k2", a="x", rest=("k3",), first="k1")
    assert got == [b"k1", b"k2", b"x", b"2", [b"k3"], [b"t1", b"t2"], 3, 4]


async def test_a_mapping_fills_a_tail_with_its_field_value_pairs(r):
    got = await _ECHO(r, first="k1", second="k2", a=1, b=2, rest=[], tail={"status": "done", "n": 3})
    assert got == [b"k1", b"k2", b"1", b"2", [], [b"status", b"done", b"n", b"3"], 2, 6]


async def test_empty_variadic_tails(r):
    got = await _ECHO(r, first="k1", second="k2", a=1, b=2, rest=[], tail=())
    assert got == [b"k1", b"k2", b"1", b"2", [], [], 2, 2]


@pytest.mark.parametrize(
    "params, word",
    [
        (dict(first="k1", second="k2", a=1, rest=[], tail=[]), "missing ['b']"),
        (dict(first="k1", second="k2", a=1, b=2, rest=[], tail=[], c=3), "unknown ['c']"),
        (dict(first="k1", second="k2", a=1, b=2, tail=[]), "missing ['rest']"),
    ],
)
async def test_a_missing_or_unknown_name_is_a_type_error(r, params, word):
    with pytest.raises(TypeError, match=word.replace("[", r"\[").replace("]", r"\]")):
        await _ECHO(r, **params)
    with pytest.raises(TypeError):
        _ECHO.queue(r.pipeline(transaction=False), **params)


@pytest.mark.parametrize(
    "params",
    [
        dict(first="k1", second="k2", a=1, b=2, rest=[], tail="ab"),  # a str would spread into characters
        dict(first="k1", second="k2", a=[1], b=2, rest=[], tail=[]),  # a list for one value
        dict(first=b"k1", second="k2", a=1, b=2, rest=[], tail=[]),  # keys are str
        dict(first="k1", second="k2", a=1, b=2, rest=[1], tail=[]),
    ],
)
async def test_a_value_of_the_wrong_shape_is_a_type_error(r, params):
    with pytest.raises(TypeError):
        await _ECHO(r, **params)


def test_declarations_are_checked():
    with pytest.raises(ValueError):
        Script(keys=("a", "a"), source="return 1")
    with pytest.raises(ValueError):
        Script(keys=("*a", "b"), source="return 1")  # only the last name may be variadic
    with pytest.raises(ValueError):
        Script(args=("not-lua",), source="return 1")
    with pytest.raises(ValueError):
        FencedScript(keys=("lease",), source="return 1")  # the fence's own keyword


async def test_missing_script_is_sent_once_and_then_run_by_sha(r):
    assert await _SET(r, target="k", value="v1") == b"OK"  # EVALSHA fails: EVAL
    await r.script_flush()  # a restarted Redis forgot its scripts
    assert await _SET(r, target="k", value="v2") == b"OK"
    assert await r.get("k") == b"v2"
    assert (await r.script_exists(_SET.sha)) == [True]


async def test_a_pipeline_reports_a_missing_script_and_runs_after_load(r):
    await r.script_flush()
    pipe = r.pipeline(transaction=False)
    _SET.queue(pipe, target="k", value="v")
    with pytest.raises(NoScriptError):
        await pipe.execute()
    await _SET.load(r)
    pipe = r.pipeline(transaction=False)
    _SET.queue(pipe, target="k", value="v")
    assert await pipe.execute() == [b"OK"]


async def test_fenced_script_runs_while_the_lease_is_held_and_refuses_after(r):
    lease = await leases.take(r, "lease-key", "me", 10_000)
    assert lease is not None
    # The fence's slots are not the script's: its ARGV holds its own two values and its tail.
    assert await _FENCED_SET(r, target="k", value="v1", more=["x"], lease=lease) == 2
    assert await r.get("k") == b"v1"
    await r.delete("lease-key")
    peer = await leases.take(r, "lease-key", "peer", 10_000)
    assert peer is not None
    with pytest.raises(LeaseLost):
        await _FENCED_SET(r, target="k", value="v2", more=[], lease=lease)
    assert await r.get("k") == b"v1"
    # Queued on a pipeline, the refusal is a FENCED error reply.
    pipe = r.pipeline(transaction=False)
    _FENCED_SET.queue(pipe, target="k", value="v3", more=[], lease=lease)
    (reply,) = await pipe.execute(raise_on_error=False)
    assert isinstance(reply, ResponseError) and str(reply).startswith(leases.FENCED)
    assert await r.get("k") == b"v1"


async def test_fenced_script_without_a_lease_runs(r):
    assert await _FENCED_SET(r, target="k", value="v", more=[]) == 1
    assert await r.get("k") == b"v"
    with pytest.raises(TypeError):
        await _FENCED_SET(r, target="k", value="v")  # the tail is still required


async def test_execute_runs_plain_commands_under_a_lease(r):
    lease = await leases.take(r, "{t}lease", "me", 10_000)
    ok, n, missing = await leases.execute(r, lease, ("SET", "{t}a", "1"), ("INCR", "{t}a"), ("GET", "{t}missing"))
    assert (ok, n) == (b"OK", 2) and not missing  # a nil reply is false in Lua: None or False here


class _Recording:
    """A client that records the EVALSHA calls made through it (on top of fakeredis)."""

    def __init__(self, r) -> None:
        self.r = r
        self.calls: list[tuple] = []

    async def evalsha(self, sha, numkeys, *keys_and_args):
        self.calls.append((numkeys, *keys_and_args))
        return await self.r.evalsha(sha, numkeys, *keys_and_args)

    async def eval(self, source, numkeys, *keys_and_args):
        self.calls.append((numkeys, *keys_and_args))
        return await self.r.eval(source, numkeys, *keys_and_args)


async def test_execute_declares_every_key_its_commands_name(r):
    lease = await leases.take(r, "{t}lease", "me", 10_000)
    client = _Recording(r)
    await leases.execute(client, lease, ("DEL", "{t}a", "{t}b"), ("ZADD", "{t}z", 1, "m"), ("SREM", "{t}a", "m"))
    numkeys, *rest = client.calls[-1]
    assert rest[:numkeys] == ["{t}lease", "{t}a", "{t}b", "{t}z"]  # the fence, then each key once


async def test_execute_without_a_lease_is_routed_by_its_first_key(r):
    client = _Recording(r)
    assert await leases.execute(client, None, ("SET", "{t}a", "1"), ("GET", "{t}a")) == [b"OK", b"1"]
    numkeys, *rest = client.calls[-1]
    assert rest[:numkeys] == ["{t}a", "{t}a"]  # no key "" (slot 0, anywhere on a cluster)
    assert await leases.execute(client, None) == []


async def test_execute_refuses_a_key_outside_the_slot_and_a_command_it_cannot_read(r):
    lease = await leases.take(r, "{t}lease", "me", 10_000)
    with pytest.raises(ValueError, match="not in the slot"):
        await leases.execute(r, lease, ("SET", "{t}a", "1"), ("SET", "{u}a", "1"))
    with pytest.raises(ValueError, match="one slot"):
        await leases.execute(r, None, ("SET", "{t}a", "1"), ("SET", "{u}a", "1"))
    with pytest.raises(ValueError, match="cannot tell the keys"):
        await leases.execute(r, lease, ("EVAL", "return 1", "0"))
    assert await r.exists("{t}a", "{u}a") == 0
