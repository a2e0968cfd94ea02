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
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterable, AsyncIterator, Protocol

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

    async def append(self, key: str, data: bytes, offset: int, *, token: int = 0) -> int:
        """Store ``data`` at ``offset`` of a file built piece by piece; return ``offset + len(data)``.

        The bytes before ``offset`` are never changed, and nothing stored by a call with a higher
        ``token`` (the caller's fencing token) is ever changed or removed. Callers must store the
        same bytes at any position whoever writes them (the finalizer's result files are a function
        of the results stream), so a stale writer repeating an old append changes nothing and a
        writer redoing an append after a crash completes the file. Stored bytes past the end that
        came from calls with a lower or equal token may be dropped (S3) or kept (local files, where
        the caller never writes past what it commits); a file is read up to its recorded size.
        """

    def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """Yield the stored bytes of ``key`` from ``offset`` on, in chunks; FileNotFoundError if absent.

        A reader that stops early closes it (``aclose``), which releases the file or connection.
        """

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

    async def append(self, key: str, data: bytes, offset: int, *, token: int = 0) -> int:
        # Written in place and never truncated: a paused writer resuming with a stale offset
        # rewrites bytes that are already there, identical, instead of cutting off (or leaving a
        # hole of NUL bytes in) what a newer writer stored after them. ``token`` is not needed.
        path = self._path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        async with aiofiles.open(fd, "r+b") as f:
            size = os.fstat(fd).st_size
            if offset > size:
                raise ValueError(f"append to {key!r} at {offset}, past its end at {size}")
            await f.seek(offset)
            await f.write(data)
            await f.flush()
            # The caller records the new offset in Redis next: the bytes must be durable first.
            await aiofiles.os.wrap(os.fsync)(fd)
        return offset + len(data)

    async def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncGenerator[bytes, None]:
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
    built by ``append`` is a set of part objects ``<prefix>/<key>.parts/<start>-<token>`` (both 20
    digits; token 0 is written ``<start>`` alone, as parts were before tokens). The file is what
    they show when laid over each other in order of token (a higher token covers a lower one where
    they overlap), read from offset 0 up to the first gap. An append with token T writes one part,
    and deletes only parts of token <= T: first those starting at or after its offset (newest
    first, so a crash leaves the bytes before the offset intact), then, once its part is stored,
    the part it replaced. So a redone append drops the leftovers of the interrupted one, and a
    stale writer (a lower token) can neither remove nor cover anything a newer one stored. When the
    part before the offset has a token <= T and, with the new data, fits in ``merge_below`` bytes
    (or reaches past the offset), it is rewritten with the data appended instead of getting a
    neighbour: a file made of many small appends has at most about two parts per ``merge_below``
    bytes, and an append copies at most that much. A key is stored either by ``write`` or by
    ``append``, never both.

    Reads fetch ranges of ``read_window`` bytes one request at a time, so a reader that pauses
    (the feeder keeps one open per running batch) holds neither a connection nor more than a
    window of memory.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 8 * MiB,
        read_window: int = 1 * MiB,
        merge_below: int = 1 * MiB,
        max_connections: int = 64,
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
                    self._client = await self._stack.enter_async_context(
                        get_session().create_client(
                            "s3",
                            endpoint_url=self.endpoint_url,
                            region_name=self.region,
                            config=config,
                        )
                    )
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
            answer = await s3.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
            )
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
                await s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            if upload_id is not None:
                # The parts uploaded so far are dropped; the object never existed.
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise
        finally:
            self._live_uploads.discard(upload_id)
        return total

    async def read(self, key: str, chunk_size: int = CHUNK, offset: int = 0) -> AsyncGenerator[bytes, None]:
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
        listing = await self._listing(s3, key)
        if not listing:
            raise FileNotFoundError(f"nothing stored under {key!r}")
        async for chunk in self._read_layout(s3, _layout(listing), offset, None, chunk_size):
            yield chunk

    async def _read_layout(
        self, s3: Any, layout: list[_Run], start: int, stop: int | None, chunk_size: int = CHUNK
    ) -> AsyncIterator[bytes]:
        """The bytes from ``start`` to ``stop`` (None: the end) of a file laid out by :func:`_layout`."""
        for run in layout:
            lo, hi = max(run.begin, start), run.end if stop is None else min(run.end, stop)
            if lo >= hi:
                continue
            async for chunk in self._read_object(s3, run.name, lo - run.origin, chunk_size, hi - run.origin):
                yield chunk

    async def _read_object(
        self, s3: Any, name: str, start: int, chunk_size: int, stop: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes of object ``name`` from ``start`` on (up to ``stop``), one ranged GET per window."""
        from botocore.exceptions import ClientError

        pos, end, etag = start, stop, None
        while end is None or pos < end:
            last = pos + max(self.read_window, chunk_size) - 1
            if end is not None:
                last = min(last, end - 1)
            request = {"Bucket": self.bucket, "Key": name, "Range": f"bytes={pos}-{last}"}
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
                total = int(content_range.rsplit("/", 1)[1])
            else:  # the whole object came back
                data, total = data[pos:], len(data)
            end = total if end is None else min(end, total)
            data = data[: max(0, end - pos)]
            if not data:
                return
            pos += len(data)
            for i in range(0, len(data), chunk_size):
                yield data[i : i + chunk_size]

    async def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        name = self._name(key)
        s3 = await self._s3()
        try:
            return int((await s3.head_object(Bucket=self.bucket, Key=name))["ContentLength"])
        except ClientError as e:
            if _code(e) not in ("NoSuchKey", "404", "NotFound"):
                raise
        listing = await self._listing(s3, key)
        if not listing:
            return None
        layout = _layout(listing)
        return layout[-1].end if layout else 0

    async def delete(self, key: str) -> None:
        name = self._name(key)
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=name)
        stale = await self._listing(s3, key)
        for i in range(0, len(stale), 1000):
            await s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": part.name} for part in stale[i : i + 1000]], "Quiet": True},
            )

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

    async def append(self, key: str, data: bytes, offset: int, *, token: int = 0) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        s3 = await self._s3()
        listing = await self._listing(s3, key)
        layout = _layout(listing)
        stored = layout[-1].end if layout else 0
        if offset > stored:
            raise ValueError(f"append to {key!r} at {offset}, past its end at {stored}")
        # The part showing the byte just before ``offset`` is rewritten, with the data appended,
        # when it is no newer than this writer and it must be cut (it reaches past ``offset``) or
        # is small enough to take the data; otherwise a new part starts at ``offset``.
        start, body = offset, data
        run = next((run for run in layout if run.begin < offset <= run.end), None)
        if run is not None:
            base = next(part for part in listing if part.name == run.name)
            if base.token <= token and (base.end > offset or offset - base.start + len(data) <= self.merge_below):
                start = base.start
                keep = b"".join([c async for c in self._read_layout(s3, layout, start, offset)])
                if len(keep) != offset - start:
                    raise OSError(f"{key!r} changed while it was being appended to")
                body = keep + data
        name = self._part_name(key, start, token)
        mine = [part for part in listing if part.token <= token and part.start >= start and part.name != name]
        # Past the offset first, newest first: whenever this stops, the bytes before it are intact.
        for part in sorted((p for p in mine if p.start >= offset), key=lambda p: p.start, reverse=True):
            await s3.delete_object(Bucket=self.bucket, Key=part.name)
        await s3.put_object(Bucket=self.bucket, Key=name, Body=body)
        for part in mine:
            if part.start < offset:  # replaced by the part just stored
                await s3.delete_object(Bucket=self.bucket, Key=part.name)
        return offset + len(data)

    def _part_name(self, key: str, start: int, token: int) -> str:
        suffix = f"{start:020d}" if token == 0 else f"{start:020d}-{token:020d}"
        return f"{self._name(key)}.parts/{suffix}"

    async def _listing(self, s3: Any, key: str) -> list[_Part]:
        """Every part object of ``key``, by start offset."""
        prefix = f"{self._name(key)}.parts/"
        found = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                match = _PART.match(obj["Key"][len(prefix) :])
                if match:
                    found.append(_Part(int(match[1]), int(obj["Size"]), int(match[2] or 0), obj["Key"]))
        found.sort(key=lambda p: (p.start, p.token))
        return found


_PART = re.compile(r"^(\d{20})(?:-(\d{20}))?$")


@dataclass(frozen=True)
class _Part:
    """A part object of a file built by ``S3Storage.append``."""

    start: int
    size: int
    token: int
    name: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class _Run:
    """Bytes ``begin``..``end`` of a file, shown by the part object ``name`` that starts at ``origin``."""

    begin: int
    end: int
    origin: int
    name: str


def _layout(listing: list[_Part]) -> list[_Run]:
    """What the parts show, as runs contiguous from offset 0: parts laid over each other by token.

    Anything after a gap is left over from an interrupted append or delete, past the file's end.
    """
    runs: list[_Run] = []
    for part in sorted(listing, key=lambda p: (p.token, p.start)):
        if part.size == 0:
            continue
        kept: list[_Run] = []
        for run in runs:
            if run.end <= part.start or run.begin >= part.end:
                kept.append(run)
                continue
            if run.begin < part.start:
                kept.append(_Run(run.begin, part.start, run.origin, run.name))
            if run.end > part.end:
                kept.append(_Run(part.end, run.end, run.origin, run.name))
        kept.append(_Run(part.start, part.end, part.start, part.name))
        runs = sorted(kept, key=lambda r: r.begin)
    contiguous: list[_Run] = []
    end = 0
    for run in runs:
        if run.begin != end:
            break
        contiguous.append(run)
        end = run.end
    return contiguous


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def open_storage(settings: "Settings | Path | str") -> Storage:
    """The storage backend the configuration selects (a bare path: a local directory there)."""
    if isinstance(settings, (str, os.PathLike)):
        return LocalStorage(Path(settings))
    if settings.s3 is not None:
        return S3Storage(
            settings.s3.bucket, settings.s3.prefix, endpoint_url=settings.s3.endpoint_url, region=settings.s3.region
        )
    return LocalStorage(settings.data_dir)
