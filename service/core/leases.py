"""Leases with fencing tokens: the one primitive every role that holds a lease or lock uses.

A lease is a Redis key holding ``"<token> <holder>"`` with a TTL. Taking a free lease draws a new
token from the lease's own monotonic counter (``INCR keys.lease_seq(lease)``, in the lease's slot),
so a later holder always has a larger token than an earlier one. A TTL alone does not stop a holder that was paused (a GC pause,
a frozen VM, SIGSTOP) from resuming and writing after another process took over: so every Redis
write a holder makes runs in a script that first checks, atomically, that the lease key still
holds the holder's value. A stale holder's write is refused with a ``FENCED`` error reply, which
:class:`FencedScript` raises as :class:`LeaseLost`; the holder then drops that work (it logs
``fenced_write_refused``) and, if it wants it back, takes the lease anew and reloads its state.

Everything here is safe to run twice (redis-py re-sends a command whose reply was lost):
taking a lease its holder already has returns the same token, renewing or dropping twice
changes nothing more than once. Writes outside Redis cannot check a token; see
``Storage.append`` for how the finalizer's file writes are kept harmless instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from redis.crc import key_slot
from redis.exceptions import ResponseError

from . import keys
from .connections import Param, Pipeline, Redis, Script, Value, run_scripts

FENCED = "FENCED"


class LeaseLost(Exception):
    """A write on behalf of a lease was refused: the lease expired or another holder has it now."""


@dataclass(frozen=True)
class Lease:
    """A lease held by ``holder`` under fencing token ``token`` (what the lease key holds)."""

    key: str
    token: int
    holder: str

    @property
    def value(self) -> str:
        return f"{self.token} {self.holder}"

    @classmethod
    def parse(cls, key: str, value: bytes | str) -> "Lease":
        text = value.decode() if isinstance(value, bytes) else value
        token, _, holder = text.partition(" ")
        return cls(key, int(token), holder)


def holder_of(value: bytes | str | None) -> str:
    """The holder named by a lease key's value ("" when the lease is free or unreadable)."""
    if not value:
        return ""
    text = value.decode() if isinstance(value, bytes) else value
    return text.partition(" ")[2]


# The lease's value, or false when another holder has it. The holder already having it (a
# re-sent call) keeps its token.
_TAKE = Script(
    keys=("lease", "counter"),
    args=("holder", "ttl_ms"),
    source="""
local current = redis.call('GET', KEYS.lease)
if current then
  local sep = string.find(current, ' ', 1, true)
  if sep and string.sub(current, sep + 1) == ARGV.holder then
    redis.call('PEXPIRE', KEYS.lease, ARGV.ttl_ms)
    return current
  end
  return false
end
local value = string.format('%d', redis.call('INCR', KEYS.counter)) .. ' ' .. ARGV.holder
redis.call('SET', KEYS.lease, value, 'PX', ARGV.ttl_ms)
return value
""",
)

# Extend only the very lease given: an expired or re-taken one is never brought back.
_RENEW = Script(
    keys=("lease",),
    args=("value", "ttl_ms"),
    source="""
if redis.call('GET', KEYS.lease) == ARGV.value then return redis.call('PEXPIRE', KEYS.lease, ARGV.ttl_ms) end
return 0
""",
)

_DROP = Script(
    keys=("lease",),
    args=("value",),
    source="""
if redis.call('GET', KEYS.lease) == ARGV.value then return redis.call('DEL', KEYS.lease) end
return 0
""",
)

# The head of every fenced script: KEYS[1] is the lease key and ARGV[1] the value its holder
# expects there ("" for an unfenced call); both are removed before the script's own names are
# bound, so its body sees its own KEYS and ARGV from index 1, as if called without a fence.
_FENCE = """
local fence_key = table.remove(KEYS, 1)
local fence = table.remove(ARGV, 1)
if fence ~= '' and redis.call('GET', fence_key) ~= fence then
  return redis.error_reply('FENCED ' .. fence_key .. ' is no longer held by ' .. fence)
end
"""


class FencedScript:
    """A :class:`~service.core.connections.Script` that runs only while the caller's lease is still its own.

    It declares ``keys``, ``args`` and ``source`` as a ``Script`` does (named parameters, an
    optional variadic tail, ``KEYS.name``/``ARGV.name`` in the body). Call it with those names and
    ``lease`` (None, the default, for a caller that holds no lease, such as the API or the workers,
    whose writes are guarded otherwise); ``lease`` is therefore no name a fenced script may declare.
    A call whose lease is no longer held changes nothing and raises :class:`LeaseLost`.
    """

    def __init__(self, *, keys: Sequence[str] = (), args: Sequence[str] = (), source: str) -> None:
        if "lease" in (name.lstrip("*") for name in (*keys, *args)):
            raise ValueError("'lease' names the fence of a FencedScript; call its key something else")
        self.script = Script(keys=keys, args=args, source=source, head=_FENCE)

    @property
    def sha(self) -> str:
        return self.script.sha

    @property
    def source(self) -> str:
        return self.script.source

    async def __call__(self, r: Redis, /, *, lease: Lease | None = None, **params: Param) -> Any:
        """Run the script if ``lease`` (when given) is still held; :class:`LeaseLost` if not."""
        try:
            return await self.script.run(r, *_fenced(lease, *self.script.signature.bind(params)))
        except ResponseError as e:
            if str(e).startswith(FENCED):
                raise LeaseLost(str(e)) from None
            raise

    def queue(self, pipe: Pipeline, /, *, lease: Lease | None = None, **params: Param) -> None:
        """Add a call to a pipeline (a fenced refusal is then an error reply among the replies)."""
        self.script.enqueue(pipe, *_fenced(lease, *self.script.signature.bind(params)))

    async def load(self, r: Redis) -> None:
        """Make sure Redis has the script (after a restart wiped its script cache)."""
        await self.script.load(r)


def _fenced(lease: Lease | None, keys: Sequence[str], args: Sequence[Value]) -> tuple[list[str], list[Value]]:
    # An unfenced call still names a key in the script's first slot (its own first key), so the
    # script's keys stay in one cluster slot.
    fence_key = lease.key if lease is not None else (keys[0] if keys else "")
    return [fence_key, *keys], [lease.value if lease is not None else "", *args]


# Each command comes as its number of words and then the words; KEYS are every key they name.
_EXECUTE = FencedScript(
    keys=("*touched",),
    args=("*commands",),
    source="""
local replies = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local reply = redis.call(unpack(ARGV, i + 1, i + n))
  if reply == nil then reply = false end
  replies[#replies + 1] = reply
  i = i + n + 1
end
return replies
""",
)


async def take(r: Redis, key: str, holder: str, ttl_ms: int) -> Lease | None:
    """Take the lease ``key`` for ``holder`` (a fresh token), or None while someone else holds it.

    If ``holder`` already has it, its TTL is renewed and the same token comes back.
    """
    value = await _TAKE(r, lease=key, counter=keys.lease_seq(key), holder=holder, ttl_ms=ttl_ms)
    return Lease.parse(key, value) if value else None


async def take_many(r: Redis, lease_keys: Sequence[str], holder: str, ttl_ms: int) -> list[Lease | None]:
    """:func:`take` for several leases in one round trip."""

    def build(pipe: Pipeline) -> None:
        for key in lease_keys:
            _TAKE.queue(pipe, lease=key, counter=keys.lease_seq(key), holder=holder, ttl_ms=ttl_ms)

    values = await run_scripts(r, build, [_TAKE])  # taking twice is harmless
    return [Lease.parse(key, v) if v else None for key, v in zip(lease_keys, values)]


async def renew(r: Redis, lease: Lease, ttl_ms: int) -> bool:
    """Extend ``lease`` by ``ttl_ms``; False when it is no longer held (expired or re-taken)."""
    return bool(await _RENEW(r, lease=lease.key, value=lease.value, ttl_ms=ttl_ms))


async def renew_many(r: Redis, held: Iterable[Lease], ttl_ms: int) -> list[Lease]:
    """Renew several leases in one round trip; return those that were lost."""
    held = list(held)
    if not held:
        return []

    def build(pipe: Pipeline) -> None:
        for lease in held:
            _RENEW.queue(pipe, lease=lease.key, value=lease.value, ttl_ms=ttl_ms)

    answers = await run_scripts(r, build, [_RENEW])
    return [lease for lease, ok in zip(held, answers) if not ok]


async def drop(r: Redis, lease: Lease) -> None:
    """Give ``lease`` up at once (a peer need not wait for it to expire), if it is still held."""
    await _DROP(r, lease=lease.key, value=lease.value)


# The commands ``execute`` runs, by where their keys are: every word after the name, or the first
# one only. A command outside both is refused: its keys could not be declared.
_ALL_KEYS = frozenset({"DEL", "EXISTS", "UNLINK", "TOUCH"})
_FIRST_KEY = frozenset(
    {
        "GET", "SET", "INCR", "EXPIRE", "PEXPIRE",
        "HGET", "HSET", "HSETNX", "HDEL", "HINCRBY",
        "SADD", "SREM", "SCARD", "SISMEMBER",
        "ZADD", "ZREM", "ZSCORE", "ZCARD",
    }
)  # fmt: skip


def command_keys(command: Sequence[Any]) -> list[str]:
    """The keys a command given to :func:`execute` names; ValueError for a command it does not know."""
    name = str(command[0]).upper()
    if name in _ALL_KEYS:
        return [str(k) for k in command[1:]]
    if name in _FIRST_KEY:
        return [str(command[1])]
    raise ValueError(f"leases.execute cannot tell the keys of {name}: add it to _ALL_KEYS or _FIRST_KEY")


async def execute(r: Redis, lease: Lease | None, *commands: Sequence[Any]) -> list[Any]:
    """Run ``commands`` (each a sequence of words, e.g. ``("HSET", key, field, value)``) atomically,
    only while ``lease`` is held; return their replies. Raises :class:`LeaseLost` otherwise.

    Every key the commands name is declared to the script (a Redis Cluster routes the script by
    them and refuses one that touches an undeclared key), and all must be in the slot of ``lease``
    (of the first key when there is no lease): ValueError before anything is sent otherwise.

    For plain commands without logic between them; a write that needs logic gets a
    :class:`FencedScript` of its own.
    """
    words: list[Value] = []
    touched: list[str] = []
    for command in commands:
        words += [len(command), *command]
        touched += [k for k in command_keys(command) if k not in touched]
    if not touched and lease is None:
        return []
    slot = key_slot((lease.key if lease is not None else touched[0]).encode())
    if stray := [k for k in touched if key_slot(k.encode()) != slot]:
        where = f"the slot of {lease.key}" if lease is not None else f"one slot with {touched[0]}"
        raise ValueError(f"leases.execute: {stray} not in {where}")
    return list(await _EXECUTE(r, lease=lease, touched=touched, commands=words))
