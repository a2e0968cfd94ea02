"""Storage of file contents behind one small interface.

Only this module knows where bytes live. ``LocalStorage`` keeps them in a directory; an object
store backend can implement the same five methods.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Protocol

import aiofiles
import aiofiles.os

CHUNK = 256 * 1024
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class Storage(Protocol):
    """Where file contents live; keys are Sluice-generated ids, never user input."""

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store everything ``chunks`` yields under ``key`` atomically; return the byte count.

        If iterating ``chunks`` raises, nothing is stored and the exception propagates.
        """

    async def append(self, key: str, data: bytes, offset: int) -> int:
        """Write ``data`` at ``offset``, dropping anything stored past it; return the new size.

        Repeating a call with the same offset gives the same content, which is what makes the
        finalizer's writes safe to redo after a crash.
        """

    def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the stored bytes of ``key`` from ``offset`` on, in chunks; FileNotFoundError if absent."""

    async def size(self, key: str) -> int | None:
        """Size in bytes, or None when nothing is stored under ``key``."""

    async def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are fine."""


def _check(key: str) -> str:
    if not _KEY.match(key) or key.startswith("."):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    """Storage in a local directory (one host, or a shared mount)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._files = self.root / "files"
        self._tmp = self.root / "tmp"
        self._files.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self._files / _check(key)

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        final = self._path(key)
        tmp = self._tmp / f"{key}.{secrets.token_hex(4)}"
        total = 0
        try:
            async with aiofiles.open(tmp, "wb") as f:
                async for chunk in chunks:
                    await f.write(chunk)
                    total += len(chunk)
            await aiofiles.os.replace(tmp, final)
        except BaseException:
            try:
                await aiofiles.os.remove(tmp)
            except FileNotFoundError:
                pass
            raise
        return total

    async def append(self, key: str, data: bytes, offset: int) -> int:
        path = self._path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        async with aiofiles.open(fd, "r+b") as f:
            await f.truncate(offset)
            await f.seek(offset)
            await f.write(data)
            await f.flush()
            # The caller records the new offset in Redis next: the bytes must be durable first.
            await aiofiles.os.wrap(os.fsync)(fd)
        return offset + len(data)

    async def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncIterator[bytes]:
        async with aiofiles.open(self._path(key), "rb") as f:
            if offset:
                await f.seek(offset)
            while chunk := await f.read(chunk_size):
                yield chunk

    async def size(self, key: str) -> int | None:
        try:
            return (await aiofiles.os.stat(self._path(key))).st_size
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        try:
            await aiofiles.os.remove(self._path(key))
        except FileNotFoundError:
            pass


def open_storage(data_dir: Path) -> Storage:
    """The storage backend the configuration selects."""
    return LocalStorage(data_dir)
