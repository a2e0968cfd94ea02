"""``POST /v1/batches/{batch_id}/retry``: a new batch of a finished batch's retryable failures (a Sluice extension).

The failures worth another try are read from the batch's error file (``results.retryable``: a 429
or 5xx answer, a timeout, an unreachable provider, ``batch_expired``, ``batch_cancelled``; never a
4xx). The new batch gets its own input file, made of the original input lines of those
``custom_id`` s, streamed from the original input file to storage (only the set of ids is held in
memory, at most a batch's lines). It runs like any batch: the token's storage quota applies to
its input file and its batch quotas to the batch, each reserved atomically with the record.
Its ``metadata`` is the original's plus ``sluice_retry_of`` (the original's id); its endpoint,
completion window, priority, provider and ``output_expires_after`` are the original's, and the
request may carry the creation headers again (``x-sluice-priority``, ``x-sluice-provider``,
``x-sluice-provider-key``, ``x-sluice-webhook-url``): a client's own provider key is never kept
past its batch, so a retry that needs one sends it again.
"""

from __future__ import annotations

import contextlib
import functools
from typing import AsyncIterator

import msgspec
import structlog
from aiohttp import web

from service.core import store, webhooks
from service.core.connections import REDIS_DOWN
from service.core.errors import APIError, bad_request
from service.core.records import BatchRecord, FileRecord
from service.core.results import retryable
from service.core.storage import CHUNK, Storage
from service.core.validation import Request, check_line, iter_lines
from service.core.wire import JSON_ERRORS, TERMINAL_STATUSES, ResultOutcome

from . import api, appkeys
from .owned import owned_batch

log = structlog.get_logger("sluice.retry")

RETRY_OF_METADATA = "sluice_retry_of"
# Statuses a retry can start from: every line of the batch has its result in the output or error file.
RETRIABLE_STATUSES = ("completed", "expired", "cancelled")

_outcome = msgspec.json.Decoder(ResultOutcome)


def nothing_to_retry(message: str) -> APIError:
    return bad_request(message, code="nothing_to_retry")


async def retryable_ids(storage: Storage, error_key: str) -> set[str]:
    """The custom_ids of the error file's lines worth another try."""
    found: set[str] = set()
    async for line in iter_lines(storage, error_key):
        if line.data is None:
            continue
        try:
            result = _outcome.decode(line.data)
        except JSON_ERRORS:
            continue
        status = result.response.status_code if result.response is not None else None
        code = result.error.code if result.error is not None else None
        if result.custom_id and retryable(status, code):
            found.add(result.custom_id)
    return found


async def retry_batch(request: web.Request) -> web.Response:
    """POST /batches/{batch_id}/retry: a new batch of the batch's retryable failures."""
    settings, r = request.app[appkeys.SETTINGS], request.app[appkeys.REDIS]
    storage: Storage = request.app[appkeys.STORAGE]
    owner = request[appkeys.OWNER]
    h = await owned_batch(request)
    batch_id, status = h.id, h.status
    if status not in TERMINAL_STATUSES:
        raise APIError(
            409,
            f"Cannot retry batch {batch_id}: its status is '{status}'. Only a finished batch "
            f"({', '.join(RETRIABLE_STATUSES)}) can be retried; wait for it to end, or cancel it.",
            code="batch_not_finished",
        )
    if status == "failed":
        raise nothing_to_retry(
            f"Batch {batch_id} failed validation: none of its requests ran, so there is nothing "
            "to retry. Fix its input file and create a new batch."
        )
    metadata = dict(h.metadata or {})
    metadata[RETRY_OF_METADATA] = batch_id
    priority = h.priority or api.DEFAULT_PRIORITY
    if api.PRIORITY_HEADER in request.headers:
        # The header overrides the original's priority (its metadata echo included).
        priority = api.priority_choice(request, None) or priority
        metadata[api.PRIORITY_METADATA] = priority
    provider, sealed_key = api.provider_choice(request, settings)
    if h.byok_used and not sealed_key:
        raise bad_request(
            f"Batch {batch_id} ran with your own provider key, which Sluice does not keep past a "
            f"batch: send it again in {api.PROVIDER_KEY_HEADER} (with {api.PROVIDER_HEADER}).",
            param=api.PROVIDER_KEY_HEADER,
            code="missing_required_parameter",
        )
    webhook_url = await webhooks.url_from_header(request.headers.get(webhooks.HEADER), settings)
    if not h.error_file_id:
        raise nothing_to_retry(f"Batch {batch_id} has no failed requests: nothing to retry.")
    error_file = await store.get_file_record(r, owner, h.error_file_id)
    if error_file is None:
        raise bad_request(
            f"The error file {h.error_file_id} of batch {batch_id} was deleted: the failures to "
            "retry cannot be told any more.",
            code="error_file_deleted",
        )
    try:
        ids = await retryable_ids(storage, error_file.storage_key)
    except FileNotFoundError:
        raise bad_request(
            f"The error file {error_file.id} of batch {batch_id} is gone from storage.", code="error_file_deleted"
        ) from None
    if not ids:
        raise nothing_to_retry(
            f"Batch {batch_id} has no retryable failures: only 429 and 5xx answers, timeouts, "
            "unreachable providers, batch_expired and batch_cancelled are retried, never a 4xx "
            "answer."
        )
    input_file = await store.get_file_record(r, owner, h.input_file_id)
    if input_file is None:
        raise bad_request(
            f"The input file {h.input_file_id} of batch {batch_id} was deleted: the requests to "
            "retry are gone with it.",
            code="input_file_deleted",
        )
    try:
        file = await _write_input(request, h, input_file, ids)
    except FileNotFoundError:
        raise bad_request(
            f"The input file {input_file.id} of batch {batch_id} is gone from storage.", code="input_file_deleted"
        ) from None
    try:
        record = await api.record_batch(
            request,
            endpoint=h.endpoint,
            file=file,
            completion_window=h.completion_window,
            metadata=metadata,
            output_expires_after=h.output_expires_after or None,
            provider=provider or h.provider,
            sealed_key=sealed_key,
            webhook_url=webhook_url,
            priority=priority,
        )
    except BaseException:
        # The batch was not made (a quota, most likely): its input file must not be left behind.
        await _forget(r, storage, file)
        raise
    log.info("batch_retried", batch_id=record.id, retry_of=batch_id, lines=file.lines)
    return api.json_response(store.batch_from_record(record))


async def _write_input(request: web.Request, h: BatchRecord, input_file: FileRecord, ids: set[str]) -> FileRecord:
    """Store the input lines of ``ids`` as a new batch input file; its record, charged to the token."""
    r, storage = request.app[appkeys.REDIS], request.app[appkeys.STORAGE]
    owner, quotas = request[appkeys.OWNER], request[appkeys.QUOTAS]
    room = quotas.max_stored_bytes - await store.usage(r, owner, "stored_bytes")
    file_id, seq = await store.new_id(r, "file-")
    kept = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal kept
        size = 0
        buf = bytearray()
        async for line in iter_lines(storage, input_file.storage_key):
            request_line = check_line(line, h.endpoint)
            if not isinstance(request_line, Request) or request_line.custom_id not in ids or line.data is None:
                continue
            buf += line.data + b"\n"
            kept += 1
            if len(buf) >= CHUNK:
                size += len(buf)
                if size > room:
                    raise api.storage_quota_error(quotas)
                yield bytes(buf)
                buf.clear()
        if buf:
            if size + len(buf) > room:
                raise api.storage_quota_error(quotas)
            yield bytes(buf)

    size = await storage.write(file_id, chunks())
    if kept == 0:
        await storage.delete(file_id)
        raise nothing_to_retry(f"None of the requests to retry were found in the input file {input_file.id}.")
    # The file id is the operation's id (see store.settle), as for an upload.
    create = functools.partial(
        store.create_file,
        r,
        owner=owner,
        file_id=file_id,
        seq=seq,
        filename=f"{h.id}_retry_input.jsonl",
        purpose="batch",
        size=size,
        storage_key=file_id,
        expires_at=store.now() + api.BATCH_FILE_TTL_S,
        lines=kept,
        max_stored_bytes=quotas.max_stored_bytes,
    )
    try:
        try:
            await create()
        except REDIS_DOWN:
            if await store.settle(r, owner, file_id) is None:
                raise
            await create()  # it ran: the same call answers what it answered then
    except store.QuotaExceeded:
        await storage.delete(file_id)
        raise api.storage_quota_error(quotas) from None
    except BaseException:
        # A record owns its content; without one (settled as never made) the content goes.
        with contextlib.suppress(Exception):
            if await store.settle(r, owner, file_id) is None:
                await storage.delete(file_id)
        raise
    record = await store.get_file_record(r, owner, file_id)
    if record is None:  # deleted by a concurrent DELETE in the meantime: nothing to run
        raise bad_request(f"The retry's input file {file_id} was deleted before its batch was made.")
    return record


async def _forget(r: store.Redis, storage: Storage, file: FileRecord) -> None:
    try:
        deleted, marker = await store.delete_file(r, file, store.new_op_id())
        if deleted and marker:
            await storage.delete(file.storage_key)
            await store.content_removed(r, marker)
    except Exception as e:  # the expiry sweep removes it in the end
        log.warning("retry_input_cleanup_deferred", file_id=file.id, error=f"{type(e).__name__}: {e}")


def add_routes(app: web.Application) -> None:
    """The retry endpoint, under /v1 and on the bare path (like the API)."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/retry", retry_batch, expect_handler=api.expect_handler)
