"""HTTP handlers of the Files and Batches APIs (contract §1 and §4)."""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import quote

import msgspec
import structlog
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from service.core import keys, store, tracing, usage, webhooks
from service.core.config import Quotas, Settings, window_hours, window_seconds
from service.core.connections import REDIS_DOWN
from service.core.crypto import seal
from service.core.errors import APIError, bad_request, not_found
from service.core.records import BatchField, BatchRecord, FileRecord
from service.core.storage import CHUNK, Storage
from service.core.validation import BOM, MAX_LINE_BYTES
from service.core.wire import (
    BATCH_ENDPOINTS,
    FILE_PURPOSES,
    JSON_ERRORS,
    UPLOAD_PURPOSES,
    FileDeleted,
    FileObject,
    Page,
    UsageReport,
    json_encoder,
)

from . import appkeys, edge
from .owned import owned_batch, owned_file

log = structlog.get_logger("sluice.web")

BATCH_FILE_TTL_S = 30 * 24 * 3600
MAX_FORM_FIELD_BYTES = 4096
MAX_JSON_BODY_BYTES = 1024 * 1024
# Room an upload's multipart envelope may take per form field besides the field's value: its
# boundary line and part headers (a few hundred bytes from any real client).
FORM_PART_OVERHEAD_BYTES = 4096
BATCH_CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")


def json_response(obj: Any, status: int = 200) -> web.Response:
    """A JSON response encoded with msgspec."""
    return web.Response(body=json_encoder.encode(obj), status=status, content_type="application/json")


def upload_body_limit(settings: Settings) -> int:
    """The largest upload request body: the largest file plus its multipart envelope and form fields."""
    largest = max(settings.max_file_bytes, settings.max_batch_file_bytes)
    return largest + settings.max_form_fields * (MAX_FORM_FIELD_BYTES + FORM_PART_OVERHEAD_BYTES)


def check_declared_length(request: web.Request) -> None:
    """A 413 when the request declares (Content-Length) a body larger than its route takes.

    Runs before any of the body is read; bodies without a Content-Length (chunked) are held to
    the same limits while they are read.
    """
    declared = request.content_length
    if declared is None:
        return
    if request.match_info.handler is upload_file:
        settings = request.app[appkeys.SETTINGS]
        if declared > upload_body_limit(settings):
            raise APIError(
                413,
                f"Request body is too large: {declared} bytes declared, and uploads are limited to "
                f"{max(settings.max_file_bytes, settings.max_batch_file_bytes)} bytes per file.",
                param="file",
                code="file_too_large",
                close=True,
            )
    elif declared > MAX_JSON_BODY_BYTES:
        raise APIError(
            413,
            f"Request body is too large: {declared} bytes declared, the limit is {MAX_JSON_BODY_BYTES} bytes.",
            code="request_too_large",
            close=True,
        )


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: a body declared too large is refused before the client sends it."""
    try:
        check_declared_length(request)
    except APIError as e:
        return edge.error_response(e)
    return await edge.expect_continue(request)


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(
            f"Invalid '{name}': expected an integer, got '{raw[:64]}'.", param=name, code="invalid_type"
        ) from None
    if not lo <= value <= hi:
        raise bad_request(
            f"Invalid '{name}': {value}. It must be between {lo} and {hi}.", param=name, code="invalid_value"
        )
    return value


def _query_after(request: web.Request, prefix: str) -> str | None:
    after = request.query.get("after")
    if after is None or after == "":
        return None
    if not store.valid_id(after, prefix):
        raise bad_request(f"Invalid 'after': '{after[:64]}' is not a valid id.", param="after", code="invalid_value")
    return after


def _page(items: list[Any], has_more: bool) -> Page:
    return Page(
        data=items,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )


# ----------------------------------------------------------------------------- files
class _FirstLineCheck:
    """Looks at the first non-blank line of an upload: a batch file must start with a JSON object.

    Only the first line is checked here (as OpenAI does); every line is validated when a batch
    is created, with line numbers in ``batch.errors``.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.started = False
        self.verdict: str | None = None  # None until decided; "" when fine, else a message
        self.newlines = 0
        self.ends_open = False  # the last line has no newline

    @property
    def lines(self) -> int:
        """Lines seen so far (blank ones included): what a batch of this file would enqueue, at most."""
        return self.newlines + self.ends_open

    def feed(self, chunk: bytes) -> None:
        self.newlines += chunk.count(b"\n")
        self.ends_open = not chunk.endswith(b"\n")
        if self.verdict is not None:
            return
        if not self.started:
            self.started = True
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM) :]
        self.buf += chunk
        while self.verdict is None:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE_BYTES:
                    self.verdict = f"The first line is longer than {MAX_LINE_BYTES} bytes."
                return
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            if line.strip():
                self.verdict = self._judge(line)

    def finish(self) -> str:
        """The verdict once the whole upload was fed: "" when acceptable."""
        if self.verdict is None:
            self.verdict = self._judge(bytes(self.buf)) if bytes(self.buf).strip() else "The file is empty."
        return self.verdict

    @staticmethod
    def _judge(line: bytes) -> str:
        try:
            msgspec.json.decode(line.rstrip(b"\r"), type=dict)
        except JSON_ERRORS:
            return "Invalid file format for Batch API. Must be .jsonl (the first line is not a JSON object)."
        return ""


async def _read_field(part: BodyPartReader, idle_s: float) -> str:
    data = bytearray()
    while chunk := await edge.within_idle(part.read_chunk(MAX_FORM_FIELD_BYTES), idle_s):
        data += chunk
        if len(data) > MAX_FORM_FIELD_BYTES:
            raise bad_request(f"Form field '{part.name}' is too long.", param=part.name)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise bad_request(f"Form field '{part.name}' is not valid UTF-8.", param=part.name) from None


_DISPOSITION_NAME = re.compile(r'(?:^|;)\s*name="([^"]*)"')


def _part_name(part: BodyPartReader) -> str | None:
    """The form field name of a part, even where aiohttp's parser gives up (e.g. ';;' in a filename)."""
    if part.name is not None:
        return part.name
    m = _DISPOSITION_NAME.search(part.headers.get("Content-Disposition", ""))
    return m.group(1) if m else None


@dataclass
class _Stored:
    """An upload's content, written to storage; ``recorded`` once a file record owns it."""

    file_id: str
    seq: int
    filename: str
    size: int
    check: _FirstLineCheck
    recorded: bool = False


async def upload_file(request: web.Request) -> web.Response:
    """POST /files: a multipart upload streamed into storage."""
    settings, r, storage = request.app[appkeys.SETTINGS], request.app[appkeys.REDIS], request.app[appkeys.STORAGE]
    if not request.content_type.startswith("multipart/form-data"):
        raise bad_request("Uploads must be sent as multipart/form-data with 'file' and 'purpose' fields.")
    fields: dict[str, str] = {}
    stored: _Stored | None = None
    idle_s = settings.body_idle_timeout_s
    try:
        try:
            reader = await request.multipart()
            parts = 0
            while (part := await edge.within_idle(reader.next(), idle_s)) is not None:
                parts += 1
                if parts > settings.max_form_fields:
                    # Refused before parsing more: each part costs CPU, and the form needs only four.
                    raise APIError(
                        400,
                        f"Too many form fields: an upload takes at most {settings.max_form_fields} "
                        "('file', 'purpose', 'expires_after[anchor]', 'expires_after[seconds]').",
                        code="too_many_fields",
                        close=True,
                    )
                if not isinstance(part, BodyPartReader):
                    raise bad_request("Nested multipart bodies are not supported.")
                name = _part_name(part)
                if name == "file":
                    if stored is not None:
                        raise bad_request("Only one 'file' may be uploaded per request.", param="file")
                    stored = await _store_upload(
                        r,
                        storage,
                        settings,
                        part,
                        fields.get("purpose"),
                        request[appkeys.OWNER],
                        request[appkeys.QUOTAS],
                    )
                elif name in ("purpose", "expires_after[anchor]", "expires_after[seconds]"):
                    fields[name] = await _read_field(part, idle_s)
                else:
                    raise bad_request(
                        f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter"
                    )
        except (ValueError, AssertionError, HttpProcessingError) as e:
            # aiohttp signals malformed multipart bodies (and part headers) with these.
            raise bad_request(f"Malformed multipart body: {e}") from None
        return json_response(
            await _finish_upload(r, settings, request[appkeys.OWNER], request[appkeys.QUOTAS], fields, stored)
        )
    except BaseException:
        if stored is not None and not stored.recorded:
            await storage.delete(stored.file_id)
        raise


def storage_quota_error(quotas: Quotas) -> APIError:
    """The 429 of an upload (or a retry's input file) that would pass the token's storage quota."""
    return quota_error(
        f"Storing this file would exceed this token's storage quota of {quotas.max_stored_bytes} "
        "bytes. Delete files you no longer need.",
        "storage_quota_exceeded",
    )


def quota_error(message: str, code: str) -> APIError:
    """A 429 for a per-token quota; retrying soon does not help, so the SDK is told not to."""
    return APIError(429, message, type="insufficient_quota", code=code, headers={"x-should-retry": "false"})


async def _store_upload(
    r: store.Redis,
    storage: Storage,
    settings: Settings,
    part: BodyPartReader,
    purpose: str | None,
    owner: str,
    quotas: Quotas,
) -> _Stored:
    # Before 'purpose' is known only the general cap applies; the batch cap is checked after.
    limit = settings.max_batch_file_bytes if purpose == "batch" else settings.max_file_bytes
    room = quotas.max_stored_bytes - await store.usage(r, owner, "stored_bytes")
    file_id, seq = await store.new_id(r, "file-")
    check = _FirstLineCheck()

    async def chunks() -> AsyncIterator[bytes]:
        size = 0
        # A stalled upload is aborted: storage.write then removes what it had written.
        while chunk := await edge.within_idle(part.read_chunk(CHUNK), settings.body_idle_timeout_s):
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"File is too large: the limit is {limit} bytes.", param="file", code="file_too_large"
                )
            if size > room:
                raise storage_quota_error(quotas)
            check.feed(chunk)
            yield chunk

    size = await storage.write(file_id, chunks())
    # Only the base name is kept, without control characters: it is echoed in headers and lists.
    raw_name = (part.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    filename = "".join(ch for ch in raw_name if ch.isprintable())[:255] or "upload"
    return _Stored(file_id, seq, filename, size, check)


async def _finish_upload(
    r: store.Redis,
    settings: Settings,
    owner: str,
    quotas: Quotas,
    fields: dict[str, str],
    stored: _Stored | None,
) -> FileObject:
    purpose = fields.get("purpose")
    if not purpose:
        raise bad_request("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(
            f"Invalid value for 'purpose': '{purpose[:64]}'. Supported values are: {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
            code="invalid_value",
        )
    if stored is None:
        raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    size = stored.size
    created = store.now()
    expires_at = created + BATCH_FILE_TTL_S if purpose == "batch" else None
    if "expires_after[anchor]" in fields or "expires_after[seconds]" in fields:
        expires_at = created + _expires_after_seconds(
            fields.get("expires_after[anchor]"),
            fields.get("expires_after[seconds]"),
            "expires_after",
        )
    if purpose == "batch":
        if size > settings.max_batch_file_bytes:
            raise APIError(
                413,
                f"Batch input files are limited to {settings.max_batch_file_bytes} bytes.",
                param="file",
                code="file_too_large",
            )
        verdict = stored.check.finish()
        if verdict:
            raise bad_request(verdict, param="file", code="invalid_file_format")
    # The check while streaming saw usage as it was; this one, atomic with the reservation, counts
    # concurrent uploads too. The file id is the operation's id (see store.settle).
    record = functools.partial(
        store.create_file,
        r,
        owner=owner,
        file_id=stored.file_id,
        seq=stored.seq,
        filename=stored.filename,
        purpose=purpose,
        size=size,
        storage_key=stored.file_id,
        expires_at=expires_at,
        created_at=created,
        lines=stored.check.lines,
        max_stored_bytes=quotas.max_stored_bytes,
    )
    stored.recorded = True  # until known otherwise: an orphan content is harmless, a record without one is not
    try:
        try:
            created_file = await record()
        except REDIS_DOWN:
            # Every retry failed, so the record may or may not exist: settle which.
            if await store.settle(r, owner, stored.file_id) is None:
                stored.recorded = False
                raise
            created_file = await record()  # it ran: the same call answers what it answered then
    except store.QuotaExceeded:
        stored.recorded = False
        raise storage_quota_error(quotas) from None
    except asyncio.CancelledError:
        # The client left during the call: settle it, so that a late copy cannot record the file
        # after its content is deleted.
        stored.recorded = await store.settle(r, owner, stored.file_id) == ""
        raise
    return created_file


def _expires_after_seconds(anchor: Any, seconds: Any, param: str) -> int:
    if anchor != "created_at":
        raise bad_request(
            "Invalid value for 'anchor': only 'created_at' is supported.", param=f"{param}.anchor", code="invalid_value"
        )
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise bad_request("'seconds' must be an integer.", param=f"{param}.seconds", code="invalid_type") from None
    if isinstance(seconds, bool) or not 3600 <= value <= 2592000:
        raise bad_request("'seconds' must be between 3600 and 2592000.", param=f"{param}.seconds", code="invalid_value")
    return value


async def list_files(request: web.Request) -> web.Response:
    """GET /files: the token's files, newest first unless order=asc."""
    r = request.app[appkeys.REDIS]
    owner = request[appkeys.OWNER]
    purpose = request.query.get("purpose") or None
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise bad_request(f"Invalid value for 'purpose': '{purpose[:64]}'.", param="purpose", code="invalid_value")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("Invalid value for 'order': must be 'asc' or 'desc'.", param="order", code="invalid_value")
    limit = _query_int(request, "limit", 10000, 1, 10000)
    after = _query_after(request, "file-")
    records, has_more = await store.page(
        r,
        keys.owner_files(owner, purpose),
        keys.file,
        FileRecord.from_hash,
        after=after,
        limit=limit,
        desc=order == "desc",
        pending=keys.owner_pending(owner),
    )
    return json_response(_page([store.file_from_record(rec) for rec in records], has_more))


async def retrieve_file(request: web.Request) -> web.Response:
    """GET /files/{file_id}."""
    return json_response(store.file_from_record(await owned_file(request)))


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /files/{file_id}: exactly one of racing deletes answers 200; the content stays while a batch reads it."""
    r = request.app[appkeys.REDIS]
    h = await owned_file(request)
    deleted, marker = await store.delete_file(r, h, store.new_op_id())
    if not deleted:
        raise not_found("File", h.id, param="file_id")  # a concurrent delete (or the expiry sweep) won
    if marker:
        # The file is deleted for the client either way: whatever fails from here on is left to
        # the expiry sweep, which the marker points at the content.
        try:
            await request.app[appkeys.STORAGE].delete(h.storage_key)
            await store.content_removed(r, marker)
        except Exception as e:
            log.warning("file_content_cleanup_deferred", file_id=h.id, error=f"{type(e).__name__}: {e}")
    return json_response(FileDeleted(id=h.id))


async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /files/{file_id}/content: the raw bytes, streamed from storage."""
    h = await owned_file(request)
    chunks = request.app[appkeys.STORAGE].read(h.storage_key)
    try:
        try:
            first = await anext(chunks, b"")
        except FileNotFoundError:
            raise not_found("File", h.id, param="file_id") from None
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(h.filename, safe='')}",
            }
        )
        response.content_length = h.bytes
        await response.prepare(request)
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await chunks.aclose()


# ----------------------------------------------------------------------------- batches
async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 that says what is wrong."""
    content_type = request.content_type
    # No Content-Type at all is tolerated; a different one is a client mistake worth naming.
    if request.headers.get("Content-Type") and not (
        content_type == "application/json" or content_type.endswith("+json")
    ):
        raise bad_request(
            f"Invalid Content-Type '{content_type}': send the body as application/json.", code="invalid_content_type"
        )
    body = await _read_body(request, MAX_JSON_BODY_BYTES, request.app[appkeys.SETTINGS].body_idle_timeout_s)
    try:
        value = msgspec.json.decode(body)
    except JSON_ERRORS:
        raise bad_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.", code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return value


async def _read_body(request: web.Request, limit: int, idle_s: float) -> bytes:
    """The whole request body, at most ``limit`` bytes (else 413), aborted if it stalls for ``idle_s``."""
    body = bytearray()
    while chunk := await edge.within_idle(request.content.readany(), idle_s):
        body += chunk
        if len(body) > limit:
            raise APIError(
                413, f"Request body is too large: the limit is {limit} bytes.", code="request_too_large", close=True
            )
    return bytes(body)


def _required_str(body: dict[str, Any], name: str) -> str:
    if name not in body or body[name] is None:
        raise bad_request(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    value = body[name]
    if not isinstance(value, str):
        raise bad_request(
            f"Invalid type for '{name}': expected a string, but got {_json_type(value)} instead.",
            param=name,
            code="invalid_type",
        )
    return value


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }.get(type(value), "a value")


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(
            f"Invalid type for 'metadata': expected an object, but got {_json_type(value)} instead.",
            param="metadata",
            code="invalid_type",
        )
    if len(value) > 16:
        raise bad_request(
            "Invalid 'metadata': at most 16 key-value pairs are allowed.", param="metadata", code="invalid_value"
        )
    for k, v in value.items():
        if len(k) > 64:
            raise bad_request(
                f"Invalid 'metadata': key '{k[:64]}...' is longer than 64 characters.",
                param="metadata",
                code="invalid_value",
            )
        if not isinstance(v, str):
            raise bad_request(
                f"Invalid type for 'metadata.{k}': expected a string, but got {_json_type(v)} instead.",
                param=f"metadata.{k}",
                code="invalid_type",
            )
        if len(v) > 512:
            raise bad_request(
                f"Invalid 'metadata.{k}': values are limited to 512 characters.",
                param=f"metadata.{k}",
                code="invalid_value",
            )
    return value


async def create_batch(request: web.Request) -> web.Response:
    """POST /batches: validate the parameters, record the batch and queue it for validation."""
    settings, r = request.app[appkeys.SETTINGS], request.app[appkeys.REDIS]
    owner = request[appkeys.OWNER]
    body = await read_json_object(request)
    for name in body:
        if name not in BATCH_CREATE_FIELDS:
            raise bad_request(
                f"Unrecognized request argument supplied: {name[:64]}", param=name[:64], code="unknown_parameter"
            )
    input_file_id = _required_str(body, "input_file_id")
    endpoint = _required_str(body, "endpoint")
    if endpoint not in BATCH_ENDPOINTS:
        raise bad_request(
            f"Invalid value: '{endpoint[:64]}'. Supported values are: {', '.join(BATCH_ENDPOINTS)}.",
            param="endpoint",
            code="invalid_value",
        )
    window = _required_str(body, "completion_window")
    if window_hours(window) is None:
        raise bad_request(
            f"Invalid value for 'completion_window': '{window[:64]}'. Supported values are '24h' and, "
            "as a Sluice extension, durations from '1h' to '7d' in whole hours ('1h'..'168h') or days "
            "('1d'..'7d').",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _metadata(body.get("metadata"))
    priority = priority_choice(request, metadata)
    if priority is not None:
        # Echoed in the metadata, where the SDK can read it back.
        metadata = {**(metadata or {}), PRIORITY_METADATA: priority}
    output_expires_after = None
    if body.get("output_expires_after") is not None:
        oea = body["output_expires_after"]
        if not isinstance(oea, dict):
            raise bad_request(
                "Invalid type for 'output_expires_after': expected an object.",
                param="output_expires_after",
                code="invalid_type",
            )
        output_expires_after = _expires_after_seconds(oea.get("anchor"), oea.get("seconds"), "output_expires_after")
    provider, sealed_key = provider_choice(request, settings)
    webhook_url = await webhooks.url_from_header(request.headers.get(webhooks.HEADER), settings)
    file = await store.get_file_record(r, owner, input_file_id)
    if file is None:
        raise not_found("File", input_file_id, param="input_file_id")
    if file.purpose != "batch":
        raise bad_request(
            f"File {input_file_id} has purpose '{file.purpose}'; batch input files must have purpose 'batch'.",
            param="input_file_id",
            code="invalid_value",
        )
    record = await record_batch(
        request,
        endpoint=endpoint,
        file=file,
        completion_window=window,
        metadata=metadata,
        output_expires_after=output_expires_after,
        provider=provider,
        sealed_key=sealed_key,
        webhook_url=webhook_url,
        priority=priority or DEFAULT_PRIORITY,
    )
    return json_response(store.batch_from_record(record))


async def record_batch(
    request: web.Request,
    *,
    endpoint: str,
    file: FileRecord,
    completion_window: str,
    metadata: dict[str, str] | None,
    output_expires_after: int | None,
    provider: str,
    sealed_key: str,
    webhook_url: str,
    priority: str,
) -> BatchRecord:
    """Reserve the token's quota and record a batch of ``file`` (a checked input file record), queued
    for validation; a 429 names the quota it would pass."""
    settings, r = request.app[appkeys.SETTINGS], request.app[appkeys.REDIS]
    owner, quotas = request[appkeys.OWNER], request[appkeys.QUOTAS]
    lines = file.lines
    # In its input file's shard: the file's refs and the batch's keys share a slot.
    batch_id, seq = await store.new_id(r, "batch_", shard=keys.shard_of(file.id))
    # Reserving the quota and recording the batch are two steps joined by the batch id, the
    # operation's id: a failure in between is settled (store.settle) into one outcome or the other.
    create = functools.partial(
        store.create_batch,
        r,
        owner=owner,
        batch_id=batch_id,
        seq=seq,
        endpoint=endpoint,
        input_file_id=file.id,
        input_key=file.storage_key,
        completion_window=completion_window,
        window_s=window_seconds(completion_window, settings.completion_window_s),
        metadata=metadata,
        output_expires_after=output_expires_after,
        provider=provider,
        sealed_key=sealed_key,
        reserved_lines=lines,
        webhook_url=webhook_url,
        priority=priority,
        max_active_batches=quotas.max_active_batches,
        max_enqueued_lines=quotas.max_enqueued_lines,
        trace=tracing.new_batch_fields(request.headers.get("traceparent")),
    )
    try:
        try:
            record = await create()
        except REDIS_DOWN:
            # Every retry failed, so the batch may or may not exist: settle which, and answer that
            # rather than a 503 that would make the client create it twice.
            if await store.settle(r, owner, batch_id) is None:
                raise
            record = await create()  # it ran: the same call answers what it answered then
    except store.QuotaExceeded as e:
        if e.field == "active_batches":
            raise quota_error(
                f"This token already has {quotas.max_active_batches} unfinished batches, its quota. "
                "Wait for one to end, or cancel one.",
                "active_batches_quota_exceeded",
            ) from None
        raise quota_error(
            f"This batch's {lines} lines would exceed this token's quota of "
            f"{quotas.max_enqueued_lines} enqueued lines. Wait for running batches to end.",
            "enqueued_lines_quota_exceeded",
        ) from None
    request.app[appkeys.PUBLISHER].wake.set()
    return record


PRIORITY_HEADER = "x-sluice-priority"
PRIORITY_METADATA = "sluice_priority"
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"


def priority_choice(request: web.Request, metadata: dict[str, str] | None) -> str | None:
    """The priority a create asked for (``x-sluice-priority``, or ``metadata["sluice_priority"]``), or None."""
    chosen: str | None = None
    for value, param in (
        (request.headers.get(PRIORITY_HEADER), PRIORITY_HEADER),
        ((metadata or {}).get(PRIORITY_METADATA), f"metadata.{PRIORITY_METADATA}"),
    ):
        if value is None:
            continue
        value = value.strip()
        if value not in PRIORITIES:
            raise bad_request(
                f"Invalid value for '{param}': '{value[:64]}'. Supported values are: {', '.join(PRIORITIES)}.",
                param=param,
                code="invalid_value",
            )
        if chosen is not None and value != chosen:
            raise bad_request(
                f"{PRIORITY_HEADER} says '{chosen}' but metadata.{PRIORITY_METADATA} says '{value}': "
                "give one priority.",
                param=PRIORITY_HEADER,
                code="invalid_value",
            )
        chosen = value
    return chosen


PROVIDER_HEADER = "x-sluice-provider"
PROVIDER_KEY_HEADER = "x-sluice-provider-key"


def provider_choice(request: web.Request, settings: Settings) -> tuple[str, str]:
    """The provider a client picked for the whole batch (``x-sluice-provider``), and its own key for it, sealed."""
    name = request.headers.get(PROVIDER_HEADER, "").strip()
    key = request.headers.get(PROVIDER_KEY_HEADER, "").strip()
    if name and settings.provider(name) is None:
        names = ", ".join(p.name for p in settings.providers) or "none"
        raise bad_request(
            f"Unknown provider '{name[:64]}' in {PROVIDER_HEADER}. Configured providers: {names}.",
            param=PROVIDER_HEADER,
            code="invalid_value",
        )
    if key and not name:
        raise bad_request(
            f"{PROVIDER_KEY_HEADER} needs {PROVIDER_HEADER}: name the provider the key is for.",
            param=PROVIDER_HEADER,
            code="missing_required_parameter",
        )
    if key and not settings.secret_key:
        raise bad_request(
            "This server cannot store provider keys: SLUICE_SECRET_KEY is not set.",
            param=PROVIDER_KEY_HEADER,
            code="byok_unavailable",
        )
    return name, seal(settings.secret_key, key) if key else ""


async def retrieve_batch(request: web.Request) -> web.Response:
    """GET /batches/{batch_id}."""
    return json_response(store.batch_from_record(await owned_batch(request)))


async def list_batches(request: web.Request) -> web.Response:
    """GET /batches: the token's batches, newest first."""
    r = request.app[appkeys.REDIS]
    limit = _query_int(request, "limit", 20, 1, 100)
    after = _query_after(request, "batch_")
    records, has_more = await store.page(
        r,
        keys.owner_batches(request[appkeys.OWNER]),
        keys.batch,
        BatchRecord.from_hash,
        after=after,
        limit=limit,
        desc=True,
        pending=keys.owner_pending(request[appkeys.OWNER]),
    )
    return json_response(_page([store.batch_from_record(rec) for rec in records], has_more))


async def cancel_batch(request: web.Request) -> web.Response:
    """POST /batches/{batch_id}/cancel: stop sending lines; the finalizer writes partial results."""
    r = request.app[appkeys.REDIS]
    h = await owned_batch(request)
    applied, before = await store.transition(
        r,
        h.id,
        allowed=["validating", "in_progress"],
        fields={
            BatchField.STATUS: "cancelling",
            BatchField.CANCELLING_AT: store.now(),
            BatchField.ABORT: "batch_cancelled",
        },
        remove_from=[keys.active_batches],
    )
    if not applied and before not in ("cancelling", "cancelled"):
        raise APIError(409, f"Cannot cancel a batch with status '{before}'.")
    if applied and before == "validating":
        request.app[appkeys.PUBLISHER].wake.set()
    return json_response(store.batch_from_record(await owned_batch(request)))


async def usage_report(request: web.Request) -> web.Response:
    """GET /sluice/usage: this token's tokens by UTC day, provider and model (``days``: 1..retention, default 7)."""
    days = _query_int(request, "days", 7, 1, keys.USAGE_RETENTION_DAYS)
    rows, start, end = await usage.report(request.app[appkeys.REDIS], request[appkeys.OWNER], days)
    return json_response(UsageReport(data=rows, start_date=start, end_date=end))


def add_routes(app: web.Application) -> None:
    """The API under /v1 and on the bare paths."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/files", upload_file, expect_handler=expect_handler)
        app.router.add_get(f"{prefix}/files", list_files)
        app.router.add_get(f"{prefix}/files/{{file_id}}", retrieve_file)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", delete_file)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", file_content)
        app.router.add_post(f"{prefix}/batches", create_batch, expect_handler=expect_handler)
        app.router.add_get(f"{prefix}/batches", list_batches)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", retrieve_batch)
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch, expect_handler=expect_handler)
        app.router.add_get(f"{prefix}/sluice/usage", usage_report)
