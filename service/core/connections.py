"""Redis clients, built the same way in every process."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import inspect
import re
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence, TypedDict, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Settings

log = structlog.get_logger("sluice.redis")

# Blocking reads (XREADGROUP BLOCK) must stay well below this, or redis-py calls them timeouts.
SOCKET_TIMEOUT_S = 30.0
BLOCK_MS = 1000


def tls_options(url: str) -> dict[str, Any]:
    """Extra client options for ``url``: a ``rediss://`` URL is not verified unless it asks to be.

    Managed Redis on Heroku-like platforms presents a self-signed certificate that no CA vouches
    for, so by default the connection is encrypted but the server's certificate is not checked
    (``ssl_cert_reqs=none``). A URL that sets ``ssl_cert_reqs`` itself keeps its choice, e.g.
    ``rediss://host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis/ca.pem`` verifies the
    certificate against that CA (and the host name, unless ``ssl_check_hostname=false``).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return {}
    return {"ssl_cert_reqs": "none"}


# What a command's arguments may be (redis-py encodes each to bytes); Sluice names keys with str.
Value = str | bytes | int | float


class XPendingConsumer(TypedDict):
    """One consumer in an XPENDING summary."""

    name: bytes
    pending: int


class XPending(TypedDict):
    """An XPENDING summary (redis-py's shape): how many entries are pending, and the id range."""

    pending: int
    min: bytes | None
    max: bytes | None
    consumers: list[XPendingConsumer]


class XPendingEntry(TypedDict):
    """One pending entry of an extended XPENDING (redis-py's ``xpending_range``)."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


class Pipeline(Protocol):
    """The commands Sluice queues on a pipeline: each returns the pipeline; ``execute`` the replies."""

    def delete(self, *names: str) -> Pipeline: ...
    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Value) -> Pipeline: ...
    def get(self, name: str) -> Pipeline: ...
    def hdel(self, name: str, *fields: str | bytes) -> Pipeline: ...
    def hget(self, name: str, key: str) -> Pipeline: ...
    def hgetall(self, name: str) -> Pipeline: ...
    def hmget(self, name: str, keys: str | Sequence[str], *args: str) -> Pipeline: ...
    def hscan(self, name: str, cursor: int = 0, match: str | None = None, count: int | None = None) -> Pipeline: ...
    def mget(self, keys: str | Sequence[str], *args: str) -> Pipeline: ...
    def scard(self, name: str) -> Pipeline: ...
    def smembers(self, name: str) -> Pipeline: ...
    def time(self) -> Pipeline: ...
    def xlen(self, name: str) -> Pipeline: ...
    def xpending(self, name: str, groupname: str) -> Pipeline: ...
    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> Pipeline: ...
    def xreadgroup(
        self,
        groupname: str,
        consumername: str,
        streams: Mapping[str, str],
        count: int | None = None,
        block: int | None = None,
    ) -> Pipeline: ...
    def zcard(self, name: str) -> Pipeline: ...
    def zcount(self, name: str, min: float | str, max: float | str) -> Pipeline: ...
    def zrange(self, name: str, start: int, end: int, withscores: bool = False) -> Pipeline: ...
    def zrangebyscore(
        self,
        name: str,
        min: float | str,
        max: float | str,
        start: int | None = None,
        num: int | None = None,
        withscores: bool = False,
    ) -> Pipeline: ...
    def zrem(self, name: str, *values: str) -> Pipeline: ...

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands; one reply per command, in order (an exception object in a
        failed command's place when ``raise_on_error`` is False)."""
        ...


class Redis(Protocol):
    """The Redis client every Sluice process uses (:func:`connect`): a ``redis.asyncio.Redis``
    without ``decode_responses``, so every string reply is ``bytes``, never ``str`` (redis-py's own
    annotations say ``bytes | str``, as they cannot know that setting).

    It names only the commands Sluice uses, with the reply shapes redis-py 8 gives them by default
    (its RESP2-style "legacy" shapes, even over the RESP3 wire it speaks). A script's reply is
    ``Any``; note that a Lua ``false`` arrives as ``False`` over RESP3. A command Sluice starts
    using is added here, once: tests/unit/test_redis_protocol.py checks every one against
    redis-py's client and a real redis-server.
    """

    async def aclose(self) -> None: ...
    async def eval(self, script: str, numkeys: int, *keys_and_args: Value) -> Any: ...
    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Value) -> Any: ...
    async def exists(self, *names: str) -> int: ...
    async def get(self, name: str) -> bytes | None: ...
    async def hdel(self, name: str, *keys: str) -> int: ...
    async def hget(self, name: str, key: str) -> bytes | None: ...
    async def hgetall(self, name: str) -> dict[bytes, bytes]: ...
    async def hmget(self, name: str, keys: str | Sequence[str], *args: str) -> list[bytes | None]: ...
    def hscan_iter(
        self, name: str, match: str | None = None, count: int | None = None
    ) -> AsyncIterator[tuple[bytes, bytes]]: ...
    async def hset(
        self, name: str, key: str | None = None, value: Value | None = None, mapping: Mapping[str, Value] | None = None
    ) -> int: ...
    async def hsetnx(self, name: str, key: str, value: Value) -> int: ...
    async def incr(self, name: str, amount: int = 1) -> int: ...
    async def mget(self, keys: str | Sequence[str], *args: str) -> list[bytes | None]: ...
    async def ping(self) -> bool: ...
    def pipeline(self, transaction: bool = True) -> Pipeline: ...
    async def sadd(self, name: str, *values: str) -> int: ...
    def scan_iter(self, match: str | None = None, count: int | None = None) -> AsyncIterator[bytes]: ...
    async def script_load(self, script: str) -> str: ...
    async def smembers(self, name: str) -> set[bytes]: ...
    async def srem(self, name: str, *values: str) -> int: ...
    def sscan_iter(self, name: str, match: str | None = None, count: int | None = None) -> AsyncIterator[bytes]: ...
    # [next start id, [(entry id, fields), ...], deleted ids (Redis 7 only)]
    async def xautoclaim(
        self,
        name: str,
        groupname: str,
        consumername: str,
        min_idle_time: int,
        start_id: str = "0-0",
        count: int | None = None,
    ) -> list[Any]: ...
    async def xlen(self, name: str) -> int: ...
    async def xpending(self, name: str, groupname: str) -> XPending: ...
    async def xpending_range(
        self,
        name: str,
        groupname: str,
        min: str,
        max: str,
        count: int,
        consumername: str | None = None,
        idle: int | None = None,
    ) -> list[XPendingEntry]: ...
    async def zrange(self, name: str, start: int, end: int) -> list[bytes]: ...
    async def zrangebyscore(
        self, name: str, min: float | str, max: float | str, start: int | None = None, num: int | None = None
    ) -> list[bytes]: ...
    async def zrevrangebyscore(
        self, name: str, max: float | str, min: float | str, start: int | None = None, num: int | None = None
    ) -> list[bytes]: ...
    async def zrem(self, name: str, *values: str) -> int: ...


def connect(settings: Settings, *, max_connections: int = 64) -> Redis:
    """The Redis client of a Sluice process: a single Redis, or a Redis Cluster, as REDIS_URL's node is.

    Every Sluice process (and ``sluice tokens``) builds its clients here, so ``rediss://`` and
    passwords work the same everywhere (see :func:`tls_options`). ``settings.redis_cluster``
    (``SLUICE_REDIS_CLUSTER``) says which client: ``off`` the single-Redis client below, ``on`` a
    ``RedisCluster`` that discovers every node from the one REDIS_URL names, ``auto`` (the default)
    asks that node (``INFO cluster``) with the first command and then uses the right one for good
    (:class:`_Detecting`). ``max_connections`` bounds the commands the client has in flight: past
    it, a command waits for one to finish instead of failing, on a single Redis (its pool) as on a
    cluster (:class:`_Cluster`), where it is also the most connections to any one node.
    """
    if settings.redis_cluster == "on":
        return cast(Redis, _cluster_client(settings.redis_url, max_connections))
    plain = _single_client(settings.redis_url, max_connections)
    if settings.redis_cluster == "off":
        return plain
    return cast(Redis, _Detecting(plain, lambda: _cluster_client(settings.redis_url, max_connections)))


# One retry policy for both kinds of client: a command whose reply was lost is sent again (every
# Sluice mutation is safe to run twice).
def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3)


def _options(url: str, max_connections: int) -> dict[str, Any]:
    # What both kinds of client are built with: the same timeouts, retries and TLS.
    return {
        "max_connections": max_connections,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        **tls_options(url),
    }


def _single_client(url: str, max_connections: int) -> Redis:
    pool = aioredis.BlockingConnectionPool.from_url(url, timeout=None, **_options(url, max_connections))
    pool.connection_class = _linear_packing(pool.connection_class)
    # No decode_responses: every reply is bytes, which is what the Redis protocol above promises.
    # from_pool: the client owns the pool, so aclose() closes its connections (a client built with
    # Redis(connection_pool=...) leaves them open, e.g. the one that asked INFO before a cluster
    # client replaced it).
    return cast(Redis, aioredis.Redis.from_pool(pool))


class _LinearPacking:
    """A connection whose ``pack_command`` joins a command's pieces once.

    redis-py's own re-joins the whole buffer after every argument (quadratic in the command's size
    up to its 6,000-byte cutoff): a recording script carrying a few result lines spent about as long
    packing as the rest of its client-side work. Same bytes on the wire (tests/unit/test_redis_packing.py).
    """

    encoder: Any
    _buffer_cutoff: int

    def pack_command(self, *args: Any) -> list[bytes | memoryview]:
        """The Redis protocol for one command, in pieces no larger than the cutoff unless one argument is."""
        assert not isinstance(args[0], float)
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        encoder = self.encoder
        encoding, errors = encoder.encoding, encoder.encoding_errors
        cutoff = self._buffer_cutoff
        output: list[bytes | memoryview] = []
        parts: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
        size = 0
        for arg in args:
            kind = type(arg)
            view = False
            # The common kinds inline; anything else (floats, a bool to refuse) as redis-py encodes it.
            if kind is str:
                arg = arg.encode(encoding, errors)
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:
                arg = encoder.encode(arg)
                view = isinstance(arg, memoryview)
            length = len(arg)
            if length > cutoff or view:
                # A large value goes as its own piece, uncopied.
                parts.append(b"$%d\r\n" % length)
                output.append(b"".join(parts))
                output.append(arg)
                parts, size = [b"\r\n"], 0
            else:
                head = b"$%d\r\n" % length
                parts += (head, arg, b"\r\n")
                size += len(head) + length + 2
                if size > cutoff:
                    output.append(b"".join(parts))
                    parts, size = [], 0
        if parts:
            output.append(b"".join(parts))
        return output


_PACKING: dict[type, type] = {}


def _linear_packing(connection_class: type) -> type:
    packing = _PACKING.get(connection_class)
    if packing is None:
        packing = _PACKING[connection_class] = type(connection_class.__name__, (_LinearPacking, connection_class), {})
    return packing


class _ClusterPipeline(ClusterPipeline):
    """redis-py's cluster pipeline with EVALSHA, TIME and MGET allowed again.

    redis-py blocks them by name in cluster pipelines (``PIPELINE_BLOCKED_COMMANDS``), yet routes
    them fine when queued as raw commands: EVALSHA and MGET by their first key (all their keys must
    share a slot, as on the server), TIME to one node. Sluice queues scripts on pipelines
    (:meth:`Script.queue`), reads the time with other replies (heartbeats, the cluster view) and
    reads many leases with one MGET per slot (``shards.mget``).
    """

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Value) -> _ClusterPipeline:  # type: ignore[override]
        self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
        return self

    def time(self) -> _ClusterPipeline:  # type: ignore[override]
        self.execute_command("TIME")
        return self

    def mget(self, keys: str | Sequence[str], *args: str) -> _ClusterPipeline:  # type: ignore[override]
        self.execute_command("MGET", *([keys] if isinstance(keys, str) else keys), *args)
        return self

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        """Send the queued commands once the client has a turn free (:class:`_Cluster`)."""
        client = cast(_Cluster, self.cluster_client)
        return await client.in_turn(lambda: super(_ClusterPipeline, self).execute(raise_on_error, allow_redirections))


_T = TypeVar("_T")

# The cluster client whose turn the running task (and the tasks it starts) holds: redis-py's
# pipeline sends a redirected command again through the client's execute_command, which must not
# wait for a second turn while holding the first (all turns held that way would never be given back).
_HOLDING: contextvars.ContextVar[object | None] = contextvars.ContextVar("sluice_cluster_turn", default=None)


class _Cluster(aioredis.RedisCluster):
    """``redis.asyncio.RedisCluster`` whose pipelines take EVALSHA and TIME (:class:`_ClusterPipeline`),
    and whose commands wait for a free connection instead of failing when ``max_connections`` are busy.

    redis-py's cluster client keeps ``max_connections`` connections per node and raises
    ``MaxConnectionsError`` (a ``ConnectionError``, which Sluice's loops take for an outage) when a
    command finds them all busy. Here a command or pipeline first takes one of ``max_connections``
    turns of the whole client (a semaphore, first come first served) and gives it back when its
    reply is in. A command or pipeline uses at most one connection of each node at a time (a
    pipeline one per node it reaches, concurrently), so no node ever has more than
    ``max_connections`` in use and acquiring one does not fail. The price: one client has at most
    ``max_connections`` commands in flight over the whole cluster, as on a single Redis, not that
    many per node.

    Left as redis-py has them: a connection that was marked for reconnect just as its command
    ended goes back to its node after a background disconnect, and a command taking the turn in
    that window still meets ``MaxConnectionsError`` (only after a connection error or a topology
    change); and the node REDIS_URL names has one connection more, redis-py's first contact with
    it, kept apart to ask for the slot map again.
    """

    def __init__(self, *, max_connections: int = 100, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self._turns = asyncio.Semaphore(max_connections)

    async def in_turn(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``call()`` holding one of the client's turns (at once if this task holds one already)."""
        if _HOLDING.get() is self:
            return await call()
        async with self._turns:
            token = _HOLDING.set(self)
            try:
                return await call()
            finally:
                _HOLDING.reset(token)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.in_turn(lambda: super(_Cluster, self).execute_command(*args, **kwargs))

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py asks a node (COMMAND GETKEYS, one more call and round trip) for the keys of
        # commands whose keys move, XREADGROUP among them: a worker's reads, one per shard, would
        # each cost two. Their keys are the first half of what follows STREAMS.
        if str(command).upper() in ("XREADGROUP", "XREAD"):
            words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
            at = next((i for i, w in enumerate(words) if w.upper() == "STREAMS"), None)
            streams = args[at + 1 :] if at is not None else ()
            slots = {self.keyslot(k) for k in streams[: len(streams) // 2]}
            if len(slots) != 1:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return int(await super()._determine_slot(command, *args))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


def _cluster_client(url: str, max_connections: int) -> _Cluster:
    # The URL's node is only the first contact: the client asks it for the slot map (CLUSTER
    # SLOTS), connects to each master it names, and follows MOVED/ASK and failovers by itself.
    # Its retries re-send a command after a lost connection, a timeout or CLUSTERDOWN (a failover
    # under way), after refreshing the slot map.
    return cast(_Cluster, _Cluster.from_url(url, **_options(url, max_connections)))


async def is_cluster(r: Any) -> bool:
    """Whether the Redis ``r`` talks to has cluster mode on (``INFO cluster`` says ``cluster_enabled:1``).

    A server that refuses INFO (a restrictive ACL, a proxy) is taken for a single Redis: set
    ``SLUICE_REDIS_CLUSTER=on`` for a cluster behind such a front.
    """
    try:
        info = await r.info("cluster")
    except ResponseError as e:
        log.info("redis_cluster_detection_refused", error=f"{type(e).__name__}: {e}")
        return False
    return str(info.get("cluster_enabled", "0")) == "1"


class _Detecting:
    """The ``auto`` client: a single-Redis client until the first command has asked the server
    whether it is a cluster node, then whichever client that answer calls for, for good.

    The question costs one ``INFO cluster``, once per client, on the single client's own pool (so a
    single Redis keeps the very client it would have had). Once answered, every attribute asked
    for is fetched from the chosen client and kept on this object, so later calls go straight to
    it. Until then: commands are coroutines that wait for the answer; ``pipeline()`` gives a
    pipeline that records its commands and replays them on the chosen client's pipeline at
    ``execute()``; ``scan_iter``/``hscan_iter`` wait for the answer on the first step; any other
    attribute is the single client's. If Redis cannot be reached, the command raises what the
    single client would have (``ConnectionError``, ...) and the next command asks again.
    """

    def __init__(self, single: Redis, build_cluster: Callable[[], Any]) -> None:
        self._single = single
        self._build_cluster = build_cluster
        self._client: Any = None
        self._lock: asyncio.Lock | None = None

    @property
    def resolved(self) -> Any:
        """The chosen client (None until the first command has run)."""
        return self._client

    async def resolve(self) -> Any:
        """Ask the server once (later calls return the same client at once)."""
        if self._client is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._client is None:
                    if await is_cluster(self._single):
                        client = self._build_cluster()
                        await self._single.aclose()
                        log.info("redis_cluster_detected")
                    else:
                        client = self._single
                    self._client = client
        return self._client

    def __getattr__(self, name: str) -> Any:
        # Reached only for names not kept on the object yet.
        if name.startswith("_"):
            raise AttributeError(name)
        if self._client is not None:
            value = getattr(self._client, name)
            if callable(value):
                self.__dict__[name] = value
            return value
        if name == "aclose":
            return self._single.aclose
        if name == "pipeline":
            return lambda transaction=True: _DeferredPipeline(self, transaction)
        if name.endswith("scan_iter"):
            return functools.partial(self._iterate, name)
        value = getattr(self._single, name)
        if not callable(value):
            return value

        async def command(*args: Any, **kwargs: Any) -> Any:
            reply = getattr(await self.resolve(), name)(*args, **kwargs)
            return await reply if inspect.isawaitable(reply) else reply

        return command

    async def _iterate(self, name: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for item in getattr(await self.resolve(), name)(*args, **kwargs):
            yield item


class _DeferredPipeline:
    """A pipeline asked for before :class:`_Detecting` knew its client: records, then replays."""

    def __init__(self, owner: _Detecting, transaction: bool) -> None:
        self._owner = owner
        self._transaction = transaction
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def queue(*args: Any, **kwargs: Any) -> _DeferredPipeline:
            self._queued.append((name, args, kwargs))
            return self

        return queue

    def __len__(self) -> int:
        return len(self._queued)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Replay the queued commands on the chosen client's pipeline and send them."""
        pipe = (await self._owner.resolve()).pipeline(transaction=self._transaction)
        for name, args, kwargs in self._queued:
            getattr(pipe, name)(*args, **kwargs)
        self._queued = []
        return list(await pipe.execute(raise_on_error=raise_on_error))


# What a script's named parameter takes: one value, or for a variadic tail a sequence of values or a
# mapping (sent as its field, value pairs, in order: what HSET and the record fields want).
Param = Value | Sequence[Value] | Mapping[str, Value]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Signature:
    """The names a script declares for its KEYS and its ARGV, and how a call's keywords fill them.

    Each of ``keys`` and ``args`` lists names in slot order; the last one may be ``"*name"``, a
    variadic tail that takes a sequence of values (or, for ARGV, a mapping, spread into its field,
    value pairs) and fills the slots after the fixed ones.
    """

    def __init__(self, keys: Sequence[str], args: Sequence[str]) -> None:
        self.keys, self.key_tail = _split(keys, "keys")
        self.args, self.arg_tail = _split(args, "args")
        tails = [t for t in (self.key_tail, self.arg_tail) if t]
        names = [*self.keys, *self.args, *tails]
        if len(set(names)) != len(names):
            raise ValueError(f"a script names one parameter twice: {names}")
        self.names = frozenset(names)

    def prologue(self) -> str:
        """Lua binding each fixed name to its slot (``KEYS.lease = KEYS[1]``), on one line."""
        bound = [f"KEYS.{n} = KEYS[{i}]" for i, n in enumerate(self.keys, 1)]
        bound += [f"ARGV.{n} = ARGV[{i}]" for i, n in enumerate(self.args, 1)]
        return " ".join(bound) + "\n" if bound else ""

    def bind(self, params: Mapping[str, Param]) -> tuple[list[str], list[Value]]:
        """The KEYS and ARGV of a call; TypeError for a missing or unknown name, or a wrong shape."""
        if params.keys() != self.names:
            missing = sorted(self.names - params.keys())
            unknown = sorted(params.keys() - self.names)
            raise TypeError(f"script parameters: missing {missing}, unknown {unknown}")
        ks: list[str] = []
        for name in self.keys:
            value = params[name]
            if not isinstance(value, str):
                raise TypeError(f"key {name!r} must be a str, not {type(value).__name__}")
            ks.append(value)
        if self.key_tail:
            for value in _tail(params, self.key_tail):
                if not isinstance(value, str):
                    raise TypeError(f"keys of {self.key_tail!r} must be str, not {type(value).__name__}")
                ks.append(value)
        argv: list[Value] = []
        for name in self.args:
            value = params[name]
            if not isinstance(value, (str, bytes, int, float)):
                raise TypeError(f"argument {name!r} takes one value, not {type(value).__name__}")
            argv.append(value)
        if self.arg_tail:
            argv.extend(_tail(params, self.arg_tail))
        return ks, argv


def _split(names: Sequence[str], what: str) -> tuple[tuple[str, ...], str]:
    fixed = list(names)
    tail = fixed.pop()[1:] if fixed and fixed[-1].startswith("*") else ""
    for name in [*fixed, *([tail] if tail else [])]:
        if not _NAME.match(name):
            raise ValueError(f"{what}: {name!r} is not a Lua identifier (only the last name may start with '*')")
    return tuple(fixed), tail


def _tail(params: Mapping[str, Param], name: str) -> Sequence[Value]:
    value = params[name]
    if isinstance(value, Mapping):
        return [item for pair in value.items() for item in pair]
    # A str is a sequence too: taken for a tail, it would spread into one slot per character.
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"variadic {name!r} takes a sequence, not {type(value).__name__}")
    return value


class Script:
    """A Lua script with named KEYS and ARGV, run by its SHA1 (EVALSHA, so Redis need not receive
    and hash it on every call; EVAL once when Redis does not have it yet).

    It declares its parameters: ``Script(keys=("lease", "counter"), args=("holder", "ttl_ms"),
    source=...)``, and is called with exactly those names as keywords:
    ``await s(r, lease=k, counter=c, holder=h, ttl_ms=10_000)``; a missing or unknown name is a
    TypeError before anything is sent.

    Inside the Lua source, a prologue binds each fixed name to its slot, so the body reads
    ``KEYS.lease`` and ``ARGV.holder`` (fields of the same tables: ``#KEYS``, ``#ARGV`` and
    ``unpack`` still see the slots alone). The last name of ``keys`` or ``args`` may be a
    variadic tail, ``"*lines"``: it is passed a sequence (list or tuple) whose values fill the
    slots after the fixed ones, which the body reads by index (``for i = 3, #ARGV, 7``).

    ``head`` is Lua that runs before the names are bound (a fence that takes slots of its own off
    KEYS and ARGV, see ``leases.FencedScript``); such a caller passes those slots through
    :meth:`run` and :meth:`enqueue`, which take the KEYS and ARGV as they are sent.
    """

    def __init__(self, *, keys: Sequence[str] = (), args: Sequence[str] = (), source: str, head: str = "") -> None:
        self.signature = Signature(keys, args)
        self.source = head + self.signature.prologue() + source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, r: Redis, /, **params: Param) -> Any:
        """Run the script with its named parameters; the first call after Redis started sends its source once."""
        return await self.run(r, *self.signature.bind(params))

    def queue(self, pipe: Pipeline, /, **params: Param) -> None:
        """Add a call to a pipeline; if it fails with NoScriptError, ``load`` and execute again."""
        self.enqueue(pipe, *self.signature.bind(params))

    async def run(self, r: Redis, keys: Sequence[str], args: Sequence[Value]) -> Any:
        """Run the script with KEYS and ARGV exactly as given (EVALSHA, else EVAL)."""
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # EVAL runs it and caches it under the same SHA for the next calls.
            return await r.eval(self.source, len(keys), *keys, *args)

    def enqueue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Value]) -> None:
        """:meth:`queue` with KEYS and ARGV exactly as given."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, r: Redis) -> None:
        """Make sure Redis has the script (after a restart wiped its script cache)."""
        await r.script_load(self.source)


class Loadable(Protocol):
    """A script whose source can be loaded into Redis (``Script``, ``leases.FencedScript``)."""

    async def load(self, r: Redis) -> None: ...


async def run_scripts(r: Redis, build: Callable[[Pipeline], None], scripts: Sequence[Loadable]) -> list[Any]:
    """Send a pipeline that ``build`` fills with calls of ``scripts`` (and plain commands); its replies.

    A Redis that forgot its scripts (restarted, or a replica just promoted) answers NoScriptError:
    the scripts are loaded and the whole pipeline is sent once more, so every call queued here must
    be safe to run twice (as every Sluice script is).
    """
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        build(pipe)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                await script.load(r)
    raise AssertionError("unreachable")


# What a lost or restarting Redis raises (BusyLoadingError while it replays its AOF is a
# ConnectionError); every loop treats these as "wait and carry on".
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class Outage:
    """Logs a Redis outage once when it starts and once when it ends; paces reconnect attempts."""

    def __init__(self, log: "structlog.typing.FilteringBoundLogger") -> None:
        self.log = log
        self.since: float | None = None
        self.delay = 0.1

    def failed(self, error: BaseException) -> float:
        """Note a failure; return how long to wait before trying again (exponential, capped)."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("redis_unavailable", error=f"{type(error).__name__}: {error}")
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay

    def ok(self) -> None:
        """Note a success; logs the recovery after an outage."""
        if self.since is not None:
            self.log.info("redis_reconnected", down_s=round(time.monotonic() - self.since, 1))
            self.since = None
            self.delay = 0.1
