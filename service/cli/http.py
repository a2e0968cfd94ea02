"""The API client's HTTP side: where Sluice is (URL and token), and requests, uploads and downloads.

Server URL and token come from ``--url`` / ``--token`` (the OpenAI CLI's ``--api-base`` /
``--api-key`` are accepted too), else ``SLUICE_URL`` / ``SLUICE_TOKEN``, else the running
``sluice up`` stack (service/cli/localstack.py), else ``http://localhost:8000`` and the
development token ``sluice up`` keeps in ``$SLUICE_DATA_DIR/dev-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiofiles
import aiohttp

from service.core.config import ClientSettings

from . import localstack
from .display import Progress

DEFAULT_URL = "http://localhost:8000"
UPLOAD_CHUNK = 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONNECTION_GRACE_S = 60.0  # how long --wait rides out an unreachable server


class ClientError(Exception):
    """A mistake or failure to report in one message, with the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class APIStatusError(ClientError):
    """Sluice answered with an error status."""

    def __init__(self, message: str, status: int, body: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


# ----------------------------------------------------------------------------- connection settings
@dataclass(frozen=True)
class Target:
    url: str  # the web root, without /v1
    token: str

    @property
    def api(self) -> str:
        return self.url + "/v1"


def normalize_url(raw: str) -> str:
    """The web root of a Sluice URL given with or without ``/v1`` (and a scheme)."""
    url = raw.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/v1")
    return url


def _dev_token(client: ClientSettings) -> str | None:
    try:
        return (client.data_dir / "dev-token").read_text().strip() or None
    except OSError:
        return None


def resolve_target(args: argparse.Namespace, client: ClientSettings | None = None) -> Target:
    """URL and token from the flags, else the environment, else the running `sluice up` stack, else the defaults.

    When the stack's connection file is used, one line on stderr says so (unless ``--quiet``).
    """
    client = client or ClientSettings.from_env()
    url = getattr(args, "url", None) or client.url
    token = getattr(args, "token", None) or client.token
    if not url or not token:
        stack = localstack.find(client)
        if stack is not None and (not url or normalize_url(url) == normalize_url(stack.api_url)):
            if not getattr(args, "quiet", False):
                localstack.announce(f"using {stack.api_url} of {stack.describe()}")
            url = url or stack.api_url
            token = token or stack.token
    url = url or DEFAULT_URL
    token = token or _dev_token(client)
    if not token:
        raise ClientError(
            "no token: pass --token TOKEN or set SLUICE_TOKEN (the token `sluice up` printed, "
            "or one of SLUICE_API_TOKENS)",
            EXIT_USAGE,
        )
    return Target(normalize_url(url), token)


# ----------------------------------------------------------------------------- HTTP
class Client:
    """The few calls of the Files and Batches APIs the commands need."""

    def __init__(self, target: Target, *, timeout: float = 60.0) -> None:
        self.target = target
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={"Authorization": f"Bearer {self.target.token}", "User-Agent": "sluice-cli"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    def _unreachable(self, exc: BaseException) -> ClientError:
        reason = str(exc) or type(exc).__name__
        return ClientError(
            f"cannot reach Sluice at {self.target.url}: {reason}\n"
            "Check --url or SLUICE_URL (is `sluice web` or `sluice up` running there?)"
        )

    async def _error_from(self, resp: aiohttp.ClientResponse) -> APIStatusError:
        raw = await resp.read()
        body: dict[str, Any] | None = None
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                body = parsed["error"]
        except ValueError:
            pass
        if body is None:
            return APIStatusError(
                f"{self.target.url} did not answer like Sluice (HTTP {resp.status} for {resp.method} {resp.url.path}, "
                f"{resp.content_type or 'no content type'}); check --url or SLUICE_URL",
                resp.status,
                None,
            )
        message = str(body.get("message") or "")
        if resp.status == 401:
            return APIStatusError(
                f"the token was refused by Sluice at {self.target.url} ({message.rstrip('.')}); "
                "check --token or SLUICE_TOKEN",
                401,
                body,
            )
        details = ", ".join(f"{k} {body[k]}" for k in ("code", "param") if body.get(k))
        return APIStatusError(
            f"{message}" + (f" ({details})" if details else "") + f" [HTTP {resp.status}]", resp.status, body
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer, or a ClientError saying what went wrong."""
        assert self._session is not None
        try:
            async with self._session.request(method, self.target.api + path, **kwargs) as resp:
                if resp.status >= 400:
                    raise await self._error_from(resp)
                raw = await resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ClientError(
                        f"{self.target.url} did not answer like Sluice (not JSON from "
                        f"{method} {resp.url.path}); check --url or SLUICE_URL"
                    ) from None
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.InvalidURL, OSError) as exc:
            raise self._unreachable(exc) from None

    async def upload(
        self,
        path: Path,
        purpose: str,
        progress: Progress | None,
        *,
        start: int = 0,
        end: int | None = None,
        filename: str | None = None,
    ) -> dict[str, Any]:
        """POST /files as multipart/form-data, streaming the file (or its bytes ``start:end``) and counting them."""
        boundary = f"sluice-{uuid.uuid4().hex}"
        name = (filename or path.name).replace('"', "'").replace("\r", "").replace("\n", "")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        end = (await asyncio.to_thread(path.stat)).st_size if end is None else end
        size = end - start

        async def body() -> AsyncIterator[bytes]:
            yield head
            # Read in a thread: a Job uploads several parts at once, on one event loop.
            async with aiofiles.open(path, "rb") as f:
                await f.seek(start)
                left = size
                while left > 0 and (chunk := await f.read(min(UPLOAD_CHUNK, left))):
                    left -= len(chunk)
                    yield chunk
                    if progress is not None:
                        progress.advance(len(chunk))
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        return await self.request("POST", "/files", data=body(), headers=headers)

    async def download(self, file_id: str, dest: Path | None, *, overwrite: bool = False) -> int:
        """GET /files/{id}/content into ``dest`` (written whole, then renamed) or stdout; the bytes.

        An existing ``dest`` is never replaced unless ``overwrite``: a ClientError says so instead.
        """
        if dest is not None and not overwrite and await asyncio.to_thread(dest.exists):
            raise refuse_overwrite(dest)
        written = 0
        if dest is None:
            return await self.copy_content(file_id, sys.stdout.buffer)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with await asyncio.to_thread(open, part, "wb") as f:
                written = await self.copy_content(file_id, f)
            if overwrite:
                os.replace(part, dest)
            else:
                try:
                    # link() fails when dest appeared meanwhile, where rename() would replace it.
                    os.link(part, dest)
                except FileExistsError:
                    raise refuse_overwrite(dest) from None
                except OSError:
                    os.replace(part, dest)  # a file system without hard links
        finally:
            part.unlink(missing_ok=True)
        return written

    async def copy_content(self, file_id: str, out: BinaryIO) -> int:
        """Write GET /files/{id}/content to ``out`` as it arrives; the bytes written."""
        assert self._session is not None
        written = 0
        try:
            async with self._session.get(f"{self.target.api}/files/{file_id}/content") as resp:
                if resp.status >= 400:
                    raise await self._error_from(resp)
                async for chunk in resp.content.iter_chunked(UPLOAD_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                return written
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.InvalidURL) as exc:
            raise self._unreachable(exc) from None


def refuse_overwrite(dest: Path) -> ClientError:
    """The error for a download that would replace a file the user has."""
    return ClientError(
        f"{dest} exists already; not overwriting it (pass --force to replace it, or -o to save elsewhere)"
    )
