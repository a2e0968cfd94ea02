"""Wire types: every JSON shape Sluice sends or receives, as msgspec Structs.

The field order and the explicit ``None`` defaults follow the OpenAI contract
(../shared/openai-batch-contract.md): unset fields are sent as ``null``, not omitted.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

T = TypeVar("T")

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})

# Endpoints a batch may target (openai 2.x/3.x SDK literals).
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FILE_PURPOSES = UPLOAD_PURPOSES + ("assistants_output", "batch_output", "fine-tune-results")


# ----------------------------------------------------------------------------- errors
class ErrorDetail(Struct):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorDetail


# ----------------------------------------------------------------------------- files
class FileObject(Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(Struct):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ----------------------------------------------------------------------------- batches
class RequestCounts(Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(Struct):
    data: list[BatchError]
    object: Literal["list"] = "list"


class InputTokensDetails(Struct):
    cached_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class BatchUsage(Struct):
    """Tokens of a batch's successful lines, summed from their response bodies (OpenAI's ``usage``)."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(Struct):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    object: Literal["batch"] = "batch"
    model: str | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class Page(Struct, Generic[T]):
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: Literal["list"] = "list"


class UsageRow(Struct):
    """One day's tokens of one API token at one provider and model (``GET /v1/sluice/usage``)."""

    date: str
    provider: str
    model: str
    requests: int
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    object: Literal["sluice.usage"] = "sluice.usage"


class UsageReport(Struct):
    data: list[UsageRow]
    start_date: str
    end_date: str
    object: Literal["list"] = "list"
    has_more: bool = False


# ----------------------------------------------------------------------------- request lines
class InputLine(Struct):
    """One line of a batch input file, as far as validation needs to look into it.

    Every field is optional here so that a missing one becomes a precise validation error
    instead of a decode failure; ``body`` stays raw so it is forwarded upstream byte for byte.
    """

    custom_id: Any = UNSET
    method: Any = UNSET
    url: Any = UNSET
    body: Raw | UnsetType = UNSET


class InputBody(Struct):
    """The part of a request body validation inspects; other keys are ignored."""

    model: Any = UNSET
    stream: Any = UNSET
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


# ----------------------------------------------------------------------------- results
class ResultResponse(Struct):
    status_code: int
    request_id: str
    body: Raw


class ResultError(Struct):
    code: str
    message: str


class ResultLine(Struct):
    """One line of an output or error file (contract §6)."""

    id: str
    custom_id: str
    response: ResultResponse | None
    error: ResultError | None


class ResultStatus(Struct):
    status_code: int | None = None


class ResultCode(Struct):
    code: str | None = None


class ResultOutcome(Struct):
    """The part of a result line that says how its request ended (to pick the lines worth retrying)."""

    custom_id: str = ""
    response: ResultStatus | None = None
    error: ResultCode | None = None


json_encoder = msgspec.json.Encoder()

# What decoding untrusted JSON can raise: malformed or mistyped input, invalid UTF-8 inside
# strings, and nesting deeper than the decoder's recursion limit.
JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
