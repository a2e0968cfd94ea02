"""Building the lines of output and error files (contract §6)."""

from __future__ import annotations

import secrets

import msgspec

from .wire import JSON_ERRORS, ResultError, ResultLine, ResultResponse, json_encoder

ABORT_MESSAGES = {
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


RESULT_KINDS = ("output", "error")

# Failures without an HTTP answer that may well succeed on another try (``POST /v1/batches/{id}/retry``).
RETRYABLE_CODES = frozenset({"request_timeout", "upstream_connection_error", "batch_expired", "batch_cancelled"})


def retryable(status_code: int | None, code: str | None) -> bool:
    """Whether a failed request is worth another try: a 429 or 5xx answer, a timeout, an unreachable
    provider, or a request its batch's expiry or cancel kept from running; never a 4xx."""
    if status_code is not None:
        return status_code == 429 or 500 <= status_code <= 599
    return code in RETRYABLE_CODES


def result_filename(owner_id: str, kind: str) -> str:
    """The name of a result file: ``<id>_output.jsonl`` or ``<id>_error.jsonl``.

    The finalizer names a batch's files (and their storage keys) so, and the CLI saves what it
    downloads under the same names, a job of several batches under its job id.
    """
    if kind not in RESULT_KINDS:
        raise ValueError(f"a result file is 'output' or 'error', not {kind!r}")
    return f"{owner_id}_{kind}.jsonl"


def result_id() -> str:
    """A fresh ``batch_req_`` id for one result line."""
    return f"batch_req_{secrets.token_hex(12)}"


def json_body(data: bytes) -> msgspec.Raw | None:
    """``data`` as a single-line JSON value to embed verbatim, or None when it is not JSON."""
    try:
        data.decode()
        msgspec.json.decode(data, type=msgspec.Raw)
    except JSON_ERRORS:
        return None
    if b"\n" in data or b"\r" in data:
        # A pretty-printed answer would break the one-line-per-result format.
        return msgspec.Raw(json_encoder.encode(msgspec.json.decode(data)))
    return msgspec.Raw(data)


def response_line(custom_id: str, status: int, request_id: str, body: msgspec.Raw) -> bytes:
    """A result carrying the provider's HTTP answer."""
    return json_encoder.encode(
        ResultLine(
            id=result_id(),
            custom_id=custom_id,
            response=ResultResponse(status_code=status, request_id=request_id, body=body),
            error=None,
        )
    )


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A result for a request that got no HTTP answer (transport failure, cancel, expiry)."""
    return json_encoder.encode(
        ResultLine(
            id=result_id(),
            custom_id=custom_id,
            response=None,
            error=ResultError(code=code, message=message),
        )
    )


def abort_line(custom_id: str, reason: str) -> bytes:
    """The error-file line for a request that never ran because its batch was cancelled or expired."""
    return error_line(custom_id, reason, ABORT_MESSAGES.get(reason, reason))
