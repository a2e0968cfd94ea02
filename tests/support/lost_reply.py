"""A TCP proxy in front of redis-server that loses replies after Redis has run the command.

Every Sluice process of a test stack can talk to Redis through a :class:`LostReplyProxy`. Commands go
to Redis untouched; each complete reply coming back is, with probability ``drop_rate``, not delivered:
the proxy forwards the replies before it and then closes both connections. The command has run, its
reply is lost, and redis-py (whose clients retry on ``ConnectionError``) sends it again on a new
connection, exactly as after a network failure between a command and its reply.

The proxy runs its own asyncio loop in a daemon thread, so synchronous tests can use it::

    proxy = LostReplyProxy(redis_port, drop_rate=0.05, seed=7).start()
    ...  # point REDIS_URL at proxy.url
    proxy.heal()           # stop dropping (drop rate 0)
    proxy.dropped          # replies dropped so far
    proxy.close()

It is bounded: at most ``max_drops`` replies are ever dropped, and :meth:`close` ends every connection
and the thread.
"""

from __future__ import annotations

import asyncio
import random
import threading

_SIMPLE = frozenset(b"+-:_,#(")  # one line
_BULK = frozenset(b"$=!")  # a length line, then that many bytes and CRLF
_AGGREGATE = frozenset(b"*~>")  # a count line, then that many replies
_PAIRS = frozenset(b"%|")  # a count line, then twice that many replies


def reply_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """The offset just past the RESP2/RESP3 reply that starts at ``pos``, or None if it is incomplete."""
    if pos >= len(buf):
        return None
    kind = buf[pos]
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    if kind in _SIMPLE:
        return eol + 2
    n = int(buf[pos + 1 : eol])
    if kind in _BULK:
        if n < 0:
            return eol + 2
        end = eol + 2 + n + 2
        return end if end <= len(buf) else None
    if kind in _AGGREGATE or kind in _PAIRS:
        if n < 0:
            return eol + 2
        at: int | None = eol + 2
        for _ in range(n * 2 if kind in _PAIRS else n):
            at = reply_end(buf, at)
            if at is None:
                return None
        return at
    raise ValueError(f"not a RESP reply: type byte {bytes([kind])!r} at offset {pos}")


class LostReplyProxy:
    """Proxies 127.0.0.1:<port> to a Redis server, losing about ``drop_rate`` of its replies."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        drop_rate: float = 0.05,
        seed: int = 0,
        max_drops: int = 5000,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.drop_rate = drop_rate
        self.max_drops = max_drops
        self.random = random.Random(seed)
        self.replies = 0  # replies seen from Redis (delivered or dropped)
        self.dropped = 0
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lost-reply-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        """The ``redis://`` URL that reaches Redis through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "LostReplyProxy":
        """Listen on a free port of 127.0.0.1 and serve in the background; returns self."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_drop_rate(self, rate: float) -> None:
        """From now on, lose each reply with probability ``rate``."""
        self.drop_rate = rate

    def heal(self) -> None:
        """Deliver every reply from now on."""
        self.set_drop_rate(0.0)

    def close(self) -> None:
        """Close the listener and every connection, and stop the thread (idempotent)."""
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # ---- inside the proxy's loop
    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._pipe(client_r, client_w)
        except asyncio.CancelledError:
            pass  # closing: end quietly (asyncio's stream callback would report a cancelled task)
        finally:
            self._tasks.discard(task)

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        pair = (client_w, server_w)
        self._writers.update(pair)
        try:
            await asyncio.gather(self._commands(client_r, server_w, pair), self._replies(server_r, client_w, pair))
        finally:
            for w in pair:
                w.transport.abort()
                self._writers.discard(w)

    @staticmethod
    def _cut(pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        for w in pair:
            w.transport.abort()

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        self._cut(pair)

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair) -> None:
        buf = bytearray()
        try:
            while data := await reader.read(65536):
                buf += data
                deliver = bytearray()
                while (end := reply_end(buf)) is not None:
                    self.replies += 1
                    if self.dropped < self.max_drops and self.random.random() < self.drop_rate:
                        # The command ran; its reply (and the connection) is lost.
                        self.dropped += 1
                        if deliver:
                            writer.write(bytes(deliver))
                        self._cut(pair)
                        return
                    deliver += buf[:end]
                    del buf[:end]
                if deliver:
                    writer.write(bytes(deliver))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        self._cut(pair)
