"""Storage of file contents behind one small interface.

Only this module knows where bytes live. ``LocalStorage`` keeps them in a directory (one host);
``S3Storage`` in an S3-compatible object store (AWS S3, MinIO, R2, ...), which every process of a
multi-host deployment shares. ``open_storage`` picks the one the configuration names.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Protocol

import aiofiles
import aiofiles.os

if TYPE_CHECKING:
    from .config import Settings

CHUNK = 256 * 1024
MiB = 1024 * 1024
# Multipart uploads older than this are taken for orphans (S3Storage.remove_orphans): far longer
# than an upload of the largest file at a slow client's pace.
ORPHAN_UPLOAD_AGE_S = 24 * 3600
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

    async def remove_orphans(self, idle_s: float) -> int:
        """Remove what writes that died half-way (a process killed mid-upload) left behind; return how many.

        Only leftovers no live write can still own are removed: untouched for ``idle_s`` seconds,
        which the caller makes longer than any live upload stays silent (several processes may
        share the storage).
        """

    async def aclose(self) -> None:
        """Release connections; the storage is not used afterwards."""


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
                    if len(chunk) < io.DEFAULT_BUFFER_SIZE:
                        # A trickle would otherwise sit in the write buffer: the file's mtime must
                        # move whenever data arrives, or remove_orphans could take it for dead.
                        await f.flush()
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

    async def remove_orphans(self, idle_s: float) -> int:
        """Remove files under ``tmp/`` not written to for ``idle_s`` seconds (by their mtime)."""
        return await asyncio.to_thread(self._remove_orphans, time.time() - idle_s)

    def _remove_orphans(self, cutoff: float) -> int:
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.remove(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass  # renamed into place, or removed by a peer, meanwhile
        return removed

    async def aclose(self) -> None:
        pass


class S3Storage:
    """Storage in an S3-compatible bucket, under ``prefix``.

    A file stored by ``write`` is one object, ``<prefix>/<key>``, uploaded in parts of
    ``part_size`` bytes (one PutObject when it is smaller): only one part is held in memory, and
    nothing becomes visible before the upload completes. Objects cannot be appended to, so a file
    built by ``append`` is a run of part objects ``<prefix>/<key>.parts/<start offset, 20 digits>``
    that cover it contiguously from 0. An append replaces the part holding its offset (or adds one
    there) and deletes every later part; it first deletes those later parts, newest first, so a
    crash at any point leaves a contiguous run whose bytes before ``offset`` are intact, and the
    redone append produces the same file. When the tail part and the new data together fit in
    ``merge_below`` bytes, the tail part is rewritten with the data appended instead of getting a
    neighbour: a file made of many small appends has at most about two parts per ``merge_below``
    bytes, and an append copies at most that much. A key is stored either by ``write`` or by
    ``append``, never both.

    Reads fetch ranges of ``read_window`` bytes one request at a time, so a reader that pauses
    (the feeder keeps one open per running batch) holds neither a connection nor more than a
    window of memory.
    """

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
        part_size: int = 8 * MiB, read_window: int = 1 * MiB, merge_below: int = 1 * MiB, max_connections: int = 64,
        orphan_upload_age_s: float = ORPHAN_UPLOAD_AGE_S,
    ) -> None:
        if part_size < 5 * MiB:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.part_size = part_size
        self.read_window = read_window
        self.merge_below = merge_below
        self.max_connections = max_connections
        self.orphan_upload_age_s = orphan_upload_age_s
        self._live_uploads: set[str | None] = set()  # this process's own, never taken for orphans
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    async def _s3(self) -> Any:
        """The client, created on first use (in the running event loop)."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.config import AioConfig
                    from aiobotocore.session import get_session

                    config = AioConfig(
                        max_pool_connections=self.max_connections,
                        retries={"mode": "standard", "max_attempts": 5},
                        # Checksum headers newer botocore adds by default trip some S3-compatible stores.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    )
                    self._client = await self._stack.enter_async_context(get_session().create_client(
                        "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config,
                    ))
        return self._client

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()

    def _name(self, key: str) -> str:
        key = _check(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # ---- whole files

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        name = self._name(key)
        s3 = await self._s3()
        buf = bytearray()
        total = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []

        async def flush() -> None:
            nonlocal upload_id, buf
            if upload_id is None:
                upload_id = (await s3.create_multipart_upload(Bucket=self.bucket, Key=name))["UploadId"]
                self._live_uploads.add(upload_id)
            body, buf = bytes(buf), bytearray()
            number = len(parts) + 1
            answer = await s3.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                                          Body=body)
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})

        try:
            async for chunk in chunks:
                buf += chunk
                total += len(chunk)
                if len(buf) >= self.part_size:
                    await flush()
            if upload_id is None:
                await s3.put_object(Bucket=self.bucket, Key=name, Body=bytes(buf))
            else:
                if buf:
                    await flush()
                await s3.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                   MultipartUpload={"Parts": parts})
        except BaseException:
            if upload_id is not None:
                # The parts uploaded so far are dropped; the object never existed.
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise
        finally:
            self._live_uploads.discard(upload_id)
        return total

    async def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncIterator[bytes]:
        name = self._name(key)
        s3 = await self._s3()
        started = False
        try:
            async for chunk in self._read_object(s3, name, offset, chunk_size):
                started = True
                yield chunk
            return
        except FileNotFoundError:
            if started:
                raise
        parts = await self._parts(s3, key)
        if not parts:
            raise FileNotFoundError(f"nothing stored under {key!r}")
        for start, size, part in parts:
            if start + size <= offset or size == 0:
                continue
            async for chunk in self._read_object(s3, part, max(0, offset - start), chunk_size):
                yield chunk

    async def _read_object(self, s3: Any, name: str, start: int, chunk_size: int) -> AsyncIterator[bytes]:
        """The bytes of object ``name`` from ``start`` on, one ranged GET per window."""
        from botocore.exceptions import ClientError

        pos, end, etag = start, None, None
        while end is None or pos < end:
            request = {"Bucket": self.bucket, "Key": name,
                       "Range": f"bytes={pos}-{pos + max(self.read_window, chunk_size) - 1}"}
            if etag:
                request["IfMatch"] = etag  # the later windows must come from the same object
            try:
                answer = await s3.get_object(**request)
            except ClientError as e:
                code = _code(e)
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise FileNotFoundError(name) from None
                if code == "InvalidRange":
                    return  # ``start`` is at (or past) the end: nothing more
                if code in ("PreconditionFailed", "412"):
                    raise OSError(f"{name} changed while it was being read") from None
                raise
            async with answer["Body"] as body:
                data = await body.read()
            etag = answer.get("ETag")
            content_range = answer.get("ContentRange") or ""
            if "/" in content_range:
                end = int(content_range.rsplit("/", 1)[1])
            else:  # the whole object came back
                data, end = data[pos:], len(data)
            if not data:
                return
            pos += len(data)
            for i in range(0, len(data), chunk_size):
                yield data[i:i + chunk_size]

    async def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        name = self._name(key)
        s3 = await self._s3()
        try:
            return int((await s3.head_object(Bucket=self.bucket, Key=name))["ContentLength"])
        except ClientError as e:
            if _code(e) not in ("NoSuchKey", "404", "NotFound"):
                raise
        parts = await self._parts(s3, key)
        return sum(size for _, size, _ in parts) if parts else None

    async def delete(self, key: str) -> None:
        name = self._name(key)
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=name)
        stale = await self._listing(s3, key)
        for i in range(0, len(stale), 1000):
            await s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": part} for _, _, part in stale[i:i + 1000]], "Quiet": True})

    async def remove_orphans(self, idle_s: float) -> int:
        """Abort multipart uploads under the prefix started more than ``orphan_upload_age_s`` ago (at least ``idle_s``).

        S3 tells when an upload started, not when it last received a part (a slow client may take
        hours to fill one part), so only uploads older than any live one can be are aborted, and
        never one this process is still writing. A bucket lifecycle rule
        (AbortIncompleteMultipartUpload) does the same without this.
        """
        from botocore.exceptions import ClientError

        s3 = await self._s3()
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=max(idle_s, self.orphan_upload_age_s))
        prefix = f"{self.prefix}/" if self.prefix else ""
        aborted = 0
        async for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", ()):
                if upload["Initiated"] >= cutoff or upload["UploadId"] in self._live_uploads:
                    continue
                try:
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
                except ClientError as e:
                    if _code(e) not in ("NoSuchUpload", "404"):  # a peer aborted it meanwhile
                        raise
        return aborted

    # ---- files built by append

    async def append(self, key: str, data: bytes, offset: int) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        s3 = await self._s3()
        listing = await self._listing(s3, key)
        parts = _contiguous(listing)
        stored = parts[-1][0] + parts[-1][1] if parts else 0
        if offset > stored:
            raise ValueError(f"append to {key!r} at {offset}, past its end at {stored}")
        # The part holding the byte just before ``offset`` is rewritten when it must be cut (it
        # reaches past ``offset``) or is small enough to take the new data; otherwise a new part
        # starts at ``offset``.
        base = next(((start, size, name) for start, size, name in parts if start < offset <= start + size), None)
        start, body = offset, data
        if base is not None and (base[0] + base[1] > offset or offset - base[0] + len(data) <= self.merge_below):
            start = base[0]
            keep = b"".join([c async for c in self._read_object(s3, base[2], 0, CHUNK)])[:offset - start]
            if len(keep) != offset - start:
                raise OSError(f"part {base[2]} is shorter than its listing said")
            body = keep + data
        # Everything after the part being (re)written goes first, newest first, so that the run
        # stays contiguous whenever this stops.
        for _, _, stale in sorted((p for p in listing if p[0] > start), reverse=True):
            await s3.delete_object(Bucket=self.bucket, Key=stale)
        await s3.put_object(Bucket=self.bucket, Key=self._part_name(key, start), Body=body)
        return offset + len(data)

    def _part_name(self, key: str, start: int) -> str:
        return f"{self._name(key)}.parts/{start:020d}"

    async def _listing(self, s3: Any, key: str) -> list[tuple[int, int, str]]:
        """Every part object of ``key``: (start offset, size, object name), by offset."""
        prefix = f"{self._name(key)}.parts/"
        found = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                suffix = obj["Key"][len(prefix):]
                if len(suffix) == 20 and suffix.isdigit():
                    found.append((int(suffix), int(obj["Size"]), obj["Key"]))
        found.sort()
        return found

    async def _parts(self, s3: Any, key: str) -> list[tuple[int, int, str]]:
        return _contiguous(await self._listing(s3, key))


def _contiguous(listing: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The parts that make up the file: the run from offset 0 in which each starts where the last ended.

    Anything after a gap is left over from an interrupted append or delete, past the file's end.
    """
    run: list[tuple[int, int, str]] = []
    end = 0
    for start, size, name in listing:
        if start != end:
            break
        run.append((start, size, name))
        end = start + size
    return run


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def open_storage(settings: "Settings | Path | str") -> Storage:
    """The storage backend the configuration selects (a bare path: a local directory there)."""
    if isinstance(settings, (str, os.PathLike)):
        return LocalStorage(Path(settings))
    if settings.s3 is not None:
        return S3Storage(settings.s3.bucket, settings.s3.prefix, endpoint_url=settings.s3.endpoint_url,
                         region=settings.s3.region)
    return LocalStorage(settings.data_dir)
