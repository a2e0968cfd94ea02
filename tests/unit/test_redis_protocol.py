"""The typed Redis client (service/core/connections.py ``Redis`` and ``Pipeline``) tells the truth.

mypy trusts those protocols (``connect`` casts the real client to them), so nothing checks them but
this: every command they name exists on redis-py's client with the parameters they give it, and a
real redis-server, reached through ``connect``, answers each one in the shape its annotation says
(``bytes``, never ``str``).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline as RealPipeline

from service.core import connections
from service.core.config import Settings
from service.core.connections import Pipeline, Redis, connect


def _commands(protocol: type) -> list[str]:
    return sorted(name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value))


@pytest.mark.parametrize(
    "protocol, real", [(Redis, aioredis.Redis), (Pipeline, RealPipeline)], ids=["Redis", "Pipeline"]
)
def test_every_command_exists_on_the_real_client_with_the_parameters_given(protocol: type, real: type) -> None:
    for name in _commands(protocol):
        assert hasattr(real, name), f"{real.__name__} has no {name}"
        ours = inspect.signature(getattr(protocol, name)).parameters
        theirs = inspect.signature(getattr(real, name)).parameters
        for p in list(ours.values())[1:]:
            if p.kind is p.VAR_POSITIONAL:
                assert any(q.kind is q.VAR_POSITIONAL for q in theirs.values()), f"{name}(*{p.name})"
            else:
                assert p.name in theirs, f"{real.__name__}.{name} has no parameter {p.name!r}"
                if p.default is not p.empty:
                    assert theirs[p.name].default == p.default, f"{name}({p.name}=...): another default"


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (the few forms the protocols use), all the way down."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if typing.is_typeddict(hint):
        fields = get_type_hints(hint)
        return (
            isinstance(value, dict)
            and set(value) == set(fields)
            and all(_conforms(value[k], t) for k, t in fields.items())
        )
    if origin in (list, set):
        return isinstance(value, origin) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_conforms, value, args))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


async def test_replies_have_the_types_the_protocol_gives_them(redis_server) -> None:
    seed = redis_server.client()
    seed.set("p:k", "v")
    seed.hset("p:h", mapping={"a": "1", "b": "2"})
    seed.sadd("p:set", "x", "y")
    seed.zadd("p:z", {"m1": 1, "m2": 2})
    seed.xgroup_create("p:stream", "g", id="0", mkstream=True)
    seed.xadd("p:stream", {"f": "v"})
    seed.xadd("p:stream", {"f": "w"})
    seed.xreadgroup("g", "c1", {"p:stream": ">"})  # both pending for c1
    r = connect(Settings.from_env({"REDIS_URL": redis_server.url}), max_connections=2)
    sha = await r.script_load("return 1")
    # Every command of the protocol, with arguments that give a non-empty answer where one can.
    calls: dict[str, list[tuple[Any, ...]]] = {
        "eval": [("return 1", 0)],
        "evalsha": [(sha, 0)],
        "exists": [("p:k", "p:none")],
        "get": [("p:k",), ("p:none",)],
        "hdel": [("p:h2", "none")],
        "hget": [("p:h", "a"), ("p:h", "none")],
        "hgetall": [("p:h",)],
        "hmget": [("p:h", ["a", "none"])],
        "hset": [("p:h2", "a", "1")],
        "hsetnx": [("p:h2", "a", "2")],
        "incr": [("p:n",)],
        "mget": [(["p:k", "p:none"],)],
        "ping": [()],
        "sadd": [("p:set2", "x")],
        "script_load": [("return 2",)],
        "smembers": [("p:set",)],
        "srem": [("p:set", "y")],
        "xlen": [("p:stream",)],
        "xautoclaim": [("p:stream", "g", "c2", 0, "0-0", 10)],
        "xpending": [("p:stream", "g")],
        "xpending_range": [("p:stream", "g", "-", "+", 10)],
        "zrange": [("p:z", 0, -1)],
        "zrangebyscore": [("p:z", "-inf", "+inf", 0, 10)],
        "zrevrangebyscore": [("p:z", "+inf", "-inf", 0, 10)],
        "zrem": [("p:z", "m1")],
    }
    iterators: dict[str, tuple[Any, ...]] = {"hscan_iter": ("p:h",), "scan_iter": ("p:*",), "sscan_iter": ("p:set",)}
    assert set(_commands(Redis)) == {*calls, *iterators, "pipeline", "aclose"}, "a command this test does not run"
    try:
        for name, arg_lists in calls.items():
            hint = get_type_hints(getattr(Redis, name), vars(connections))["return"]
            for args in arg_lists:
                reply = await getattr(r, name)(*args)
                assert _conforms(reply, hint), f"{name}{args} answered {reply!r}, not {hint}"
        for name, args in iterators.items():
            hint = get_type_hints(getattr(Redis, name), vars(connections))["return"]
            assert get_origin(hint) is collections.abc.AsyncIterator
            items = [item async for item in getattr(r, name)(*args)]
            assert items and all(_conforms(item, get_args(hint)[0]) for item in items), f"{name}: {items!r}"

        pipe = r.pipeline(transaction=False)
        queued = {
            "delete": ("p:none",),
            "get": ("p:k",),
            "hdel": ("p:h2", b"none"),
            "hget": ("p:h", "a"),
            "hgetall": ("p:h",),
            "hmget": ("p:h", "a", "b"),
            "hscan": ("p:h",),
            "mget": (["p:k", "p:none"],),
            "scard": ("p:set",),
            "smembers": ("p:set",),
            "time": (),
            "xlen": ("p:stream",),
            "xpending": ("p:stream", "g"),
            "xrange": ("p:stream", "-", "+", 1),
            "xreadgroup": ("g", "c3", {"p:stream": "0"}, 1),
            "zcard": ("p:z",),
            "zcount": ("p:z", 0, "+inf"),
            "zrange": ("p:z", 0, -1, True),
            "zrangebyscore": ("p:z", "-inf", "+inf", 0, 10, True),
            "zrem": ("p:z", "none"),
            "evalsha": (sha, 0),
        }
        assert set(_commands(Pipeline)) == {*queued, "execute"}, "a pipeline command this test does not queue"
        for name, args in queued.items():
            assert getattr(pipe, name)(*args) is pipe, f"{name} does not return the pipeline"
        replies = await pipe.execute()
        assert isinstance(replies, list) and len(replies) == len(queued)
    finally:
        await r.aclose()
