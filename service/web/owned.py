"""The file or batch a request names in its path, if the caller's token owns it: else a 404.

Every handler that acts on one file or batch (the Files and Batches APIs, the events stream, the
retry endpoint) looks it up here, so that an unknown id and another token's id answer alike.
"""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from service.core import store
from service.core.errors import not_found
from service.core.records import BatchRecord, FileRecord

from . import appkeys

R = TypeVar("R")


async def owned_file(request: web.Request) -> FileRecord:
    """The record of the path's ``{file_id}`` if the caller owns it; else a 404 (``APIError``)."""
    file_id = request.match_info["file_id"]
    return _or_404(
        await store.get_file_record(request.app[appkeys.REDIS], request[appkeys.OWNER], file_id),
        "File",
        file_id,
        "file_id",
    )


async def owned_batch(request: web.Request) -> BatchRecord:
    """The record of the path's ``{batch_id}`` if the caller owns it; else a 404 (``APIError``)."""
    batch_id = request.match_info["batch_id"]
    return _or_404(
        await store.get_owned_batch(request.app[appkeys.REDIS], request[appkeys.OWNER], batch_id),
        "Batch",
        batch_id,
        "batch_id",
    )


def _or_404(rec: R | None, kind: str, object_id: str, param: str) -> R:
    if rec is None:
        raise not_found(kind, object_id, param=param)
    return rec
