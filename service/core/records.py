"""Batch and file records: the Redis hashes ``keys.batch`` and ``keys.file``, typed.

A record is decoded once, from the raw hash (``HGETALL``: bytes to bytes), into a
:class:`BatchRecord` or :class:`FileRecord`; code past that point reads typed attributes, never
field names. Decoding tolerates missing fields (each has a default: a record read with ``HMGET``
of a few fields, or one written by an older version) and ignores fields it does not know (one
written by a newer version), so records in a live Redis always decode.

Whatever writes a hash field (``HSET`` from Python, or the fields passed to a script as ARGV)
names it with the constants of :class:`BatchField` / :class:`FileField`, whose values are the
attribute names of the records: one spelling of each field name. The Lua scripts still spell the
fields they touch themselves (``store.py``, ``feeder.py``, ``finalizer.py``, ``webhooks.py``,
``delegate.py``): a field a script writes must have its attribute here, or reads never see it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import msgspec

from .wire import BatchError, BatchStatus

# A hash as HGETALL returns it (a name, since FileRecord's ``bytes`` attribute shadows the type there).
RawHash = dict[bytes, bytes]

_metadata = msgspec.json.Decoder(dict[str, str])
_errors = msgspec.json.Decoder(list[BatchError])
_names = msgspec.json.Decoder(list[str])


class BatchRecord(msgspec.Struct, kw_only=True):
    """A batch's hash (``keys.batch``), typed. An attribute's name is its field's name in the hash.

    Counters and offsets absent from the hash read 0, strings "", timestamps None.
    """

    # Written when the batch is created (store.create_batch).
    id: str = ""
    owner: str = ""
    endpoint: str = ""
    input_file_id: str = ""
    input_key: str = ""  # the input file's storage key: the content outlives a deleted file record
    completion_window: str = ""
    status: BatchStatus | None = None  # None only for a partial read or a record half gone
    created_at: int = 0
    expires_at: int | None = None
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None
    provider: str = ""  # the provider a client picked for the whole batch ("" routes by model)
    priority: str = ""
    reserved_lines: int = 0  # lines charged to the owner's enqueued_lines quota until released
    byok: str = ""  # the client's own provider key, sealed; dropped when the batch ends
    byok_used: bool = False  # outlives byok: a retry must not fall back to the server's key
    webhook_url: str = ""
    # Trace fields (service/core/tracing.py), when tracing was on at creation.
    traceparent: str = ""
    trace_started_ns: int = 0
    trace_parent: str = ""
    trace_running_ns: int = 0
    # Moved by validation and the state transitions (store.transition).
    model: str = ""
    errors: list[BatchError] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    abort: str = ""  # why the batch stops early ("batch_cancelled", "batch_expired"), once it does
    output_file_id: str = ""
    error_file_id: str = ""
    released: bool = False  # its quota was given back (store.release)
    # Counts, moved line by line by the script that records results (store._RECORD).
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage_input: int = 0
    usage_cached: int = 0
    usage_output: int = 0
    usage_reasoning: int = 0
    # Feeding (service/web/feeder.py): lines published, the offset of the next, the window.
    feed_index: int | None = None  # None until the batch started
    feed_offset: int = 0
    feed_window: int = 0
    # Delegation (workers/delegate.py): open parts, lines, providers, progress reported by them.
    deleg_open: int = 0
    deleg_lines: int = 0
    deleg_providers: frozenset[str] = frozenset()
    deleg_completed: int = 0
    deleg_failed: int = 0
    # Draining (workers/finalizer.py): results drained so far and where they went.
    fin_cursor: str = ""
    fin_out_bytes: int = 0
    fin_err_bytes: int = 0
    fin_out_lines: int = 0
    fin_err_lines: int = 0
    fin_out_file: str = ""  # "<file id>:<seq>" of the output file, fixed once
    fin_err_file: str = ""
    # Completion webhook (service/core/webhooks.py).
    webhook_attempts: int = 0
    webhook_state: str = ""

    @classmethod
    def from_hash(cls, raw: RawHash) -> BatchRecord:
        """The record of a raw hash (``HGETALL``); missing fields take their defaults, unknown ones are ignored."""
        # The fields are turned into text and handed to msgspec in lax mode, which turns the numbers
        # into ints (and "1" into True) in C: the whole record costs about what turning the hash
        # into a dict[str, str] alone did. Empty values are left out (an unset option is written as
        # ""), so they take their defaults. The fields holding JSON are decoded apart.
        text = {k.decode(): v.decode() for k, v in raw.items() if v}
        metadata, errors, providers = text.pop("metadata", ""), text.pop("errors", ""), text.pop("deleg_providers", "")
        rec = msgspec.convert(text, cls, strict=False)
        if metadata:
            rec.metadata = _metadata.decode(metadata)
        if errors:
            rec.errors = _errors.decode(errors)
        if providers:
            rec.deleg_providers = frozenset(_names.decode(providers))
        return rec

    @classmethod
    def from_values(cls, names: Sequence[str], values: Iterable[bytes | None]) -> BatchRecord:
        """The record of an ``HMGET`` of ``names``: fields not read, or absent, take their defaults."""
        return cls.from_hash({k.encode(): v for k, v in zip(names, values) if v is not None})

    @property
    def started(self) -> bool:
        """Whether the batch was published (it has a feeding position)."""
        return self.feed_index is not None

    @property
    def all_done(self) -> bool:
        """Every line of a started batch has a result recorded."""
        return self.total > 0 and self.completed + self.failed >= self.total


class FileRecord(msgspec.Struct, kw_only=True):
    """A file's hash (``keys.file``), typed. An attribute's name is its field's name in the hash."""

    id: str = ""
    owner: str = ""
    bytes: int = 0
    created_at: int = 0
    filename: str = ""
    purpose: str = ""
    storage_key: str = ""
    expires_at: int | None = None
    lines: int = 0  # lines of the content (blank ones included): what a batch of it reserves at most
    charged: bool = False  # its bytes were charged to the owner (store._CREATE_FILE), once

    @classmethod
    def from_hash(cls, raw: RawHash) -> FileRecord:
        """The record of a raw hash (``HGETALL``); missing fields take their defaults, unknown ones are ignored."""
        # Field by field: with ten fields, twice as fast as BatchRecord's way (files are listed 10,000
        # a page). An empty value (expires_at of a file that never expires) is unset, like a missing one.
        g = raw.get
        expires_at = g(b"expires_at")
        return cls(
            id=g(b"id", b"").decode(),
            owner=g(b"owner", b"").decode(),
            bytes=int(g(b"bytes") or 0),
            created_at=int(g(b"created_at") or 0),
            filename=g(b"filename", b"").decode(),
            purpose=g(b"purpose", b"").decode(),
            storage_key=g(b"storage_key", b"").decode(),
            expires_at=int(expires_at) if expires_at else None,
            lines=int(g(b"lines") or 0),
            charged=bool(g(b"charged")),
        )


class BatchField:
    """Field names of a batch's hash, for the code that writes them (the attributes of :class:`BatchRecord`)."""

    ID = "id"
    OWNER = "owner"
    ENDPOINT = "endpoint"
    INPUT_FILE_ID = "input_file_id"
    INPUT_KEY = "input_key"
    COMPLETION_WINDOW = "completion_window"
    STATUS = "status"
    CREATED_AT = "created_at"
    EXPIRES_AT = "expires_at"
    METADATA = "metadata"
    OUTPUT_EXPIRES_AFTER = "output_expires_after"
    PROVIDER = "provider"
    PRIORITY = "priority"
    RESERVED_LINES = "reserved_lines"
    BYOK = "byok"
    BYOK_USED = "byok_used"
    WEBHOOK_URL = "webhook_url"
    TRACEPARENT = "traceparent"
    TRACE_STARTED_NS = "trace_started_ns"
    TRACE_PARENT = "trace_parent"
    TRACE_RUNNING_NS = "trace_running_ns"
    MODEL = "model"
    ERRORS = "errors"
    IN_PROGRESS_AT = "in_progress_at"
    FINALIZING_AT = "finalizing_at"
    COMPLETED_AT = "completed_at"
    FAILED_AT = "failed_at"
    EXPIRED_AT = "expired_at"
    CANCELLING_AT = "cancelling_at"
    CANCELLED_AT = "cancelled_at"
    ABORT = "abort"
    OUTPUT_FILE_ID = "output_file_id"
    ERROR_FILE_ID = "error_file_id"
    RELEASED = "released"
    TOTAL = "total"
    COMPLETED = "completed"
    FAILED = "failed"
    FEED_INDEX = "feed_index"
    FEED_OFFSET = "feed_offset"
    FEED_WINDOW = "feed_window"
    DELEG_OPEN = "deleg_open"
    DELEG_LINES = "deleg_lines"
    DELEG_PROVIDERS = "deleg_providers"
    FIN_CURSOR = "fin_cursor"
    FIN_OUT_BYTES = "fin_out_bytes"
    FIN_ERR_BYTES = "fin_err_bytes"
    FIN_OUT_LINES = "fin_out_lines"
    FIN_ERR_LINES = "fin_err_lines"
    FIN_OUT_FILE = "fin_out_file"
    FIN_ERR_FILE = "fin_err_file"


class FileField:
    """Field names of a file's hash, for the code that writes them (the attributes of :class:`FileRecord`)."""

    ID = "id"
    OWNER = "owner"
    BYTES = "bytes"
    CREATED_AT = "created_at"
    FILENAME = "filename"
    PURPOSE = "purpose"
    STORAGE_KEY = "storage_key"
    EXPIRES_AT = "expires_at"
    LINES = "lines"


def field_names(names: type) -> set[str]:
    """The field names a ``BatchField``/``FileField`` class defines."""
    return {v for k, v in vars(names).items() if k.isupper()}
