"""What decoding a batch or file record costs: ``python -m bench.record_decode [--n N] [--repeat R]``.

Decodes the raw hash of a record (``HGETALL``: bytes to bytes) as a ``GET /v1/batches`` page or
the finalizer does, N times, and prints the CPU µs per record, the best of R runs, for each shape of
record, two ways: as before typed records (the hash turned into a ``dict[str, str]``, then read
field by field with ``int(h.get(...) or 0)``; the code of that time is kept below for comparison
only) and as now (``BatchRecord.from_hash``/``FileRecord.from_hash``). Each is timed alone (the
record) and with the wire object built from it (what the API answers with).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable, cast

import msgspec

from service.core import store
from service.core.records import BatchRecord, FileRecord
from service.core.wire import (
    Batch,
    BatchError,
    BatchErrors,
    BatchStatus,
    BatchUsage,
    FileObject,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
)


# ----------------------------------------------------------------------------- before (commit 7976430)
def _str(h: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


def _before_counts(h: dict[str, str]) -> RequestCounts:
    total, completed, failed = (int(h.get(name) or 0) for name in ("total", "completed", "failed"))
    shown_completed = min(max(0, int(h.get("deleg_completed") or 0)), max(0, total - completed - failed))
    shown_failed = min(max(0, int(h.get("deleg_failed") or 0)), max(0, total - completed - failed - shown_completed))
    return RequestCounts(total=total, completed=completed + shown_completed, failed=failed + shown_failed)


def _before_usage(h: dict[str, str]) -> BatchUsage:
    n = {kind: int(h.get(f"usage_{kind}") or 0) for kind in ("input", "cached", "output", "reasoning")}
    return BatchUsage(
        input_tokens=n["input"],
        input_tokens_details=InputTokensDetails(cached_tokens=n["cached"]),
        output_tokens=n["output"],
        output_tokens_details=OutputTokensDetails(reasoning_tokens=n["reasoning"]),
        total_tokens=n["input"] + n["output"],
    )


def _before_batch(h: dict[str, str]) -> Batch:
    def ts(name: str) -> int | None:
        v = h.get(name)
        return int(v) if v else None

    errors = None
    if h.get("errors"):
        errors = BatchErrors(data=msgspec.json.decode(h["errors"], type=list[BatchError]))
    return Batch(
        id=h["id"],
        endpoint=h["endpoint"],
        input_file_id=h["input_file_id"],
        completion_window=h["completion_window"],
        status=cast(BatchStatus, h["status"]),
        created_at=int(h["created_at"]),
        model=h.get("model") or None,
        errors=errors,
        output_file_id=h.get("output_file_id") or None,
        error_file_id=h.get("error_file_id") or None,
        request_counts=_before_counts(h),
        usage=_before_usage(h),
        metadata=msgspec.json.decode(h["metadata"]) if h.get("metadata") else None,
        in_progress_at=ts("in_progress_at"),
        expires_at=ts("expires_at"),
        finalizing_at=ts("finalizing_at"),
        completed_at=ts("completed_at"),
        failed_at=ts("failed_at"),
        expired_at=ts("expired_at"),
        cancelling_at=ts("cancelling_at"),
        cancelled_at=ts("cancelled_at"),
    )


def _before_file(h: dict[str, str]) -> FileObject:
    return FileObject(
        id=h["id"],
        bytes=int(h["bytes"]),
        created_at=int(h["created_at"]),
        filename=h["filename"],
        purpose=h["purpose"],
        expires_at=int(h["expires_at"]) if h.get("expires_at") else None,
    )


# ----------------------------------------------------------------------------- records
def _raw(fields: dict[str, Any]) -> dict[bytes, bytes]:
    return {k.encode(): str(v).encode() for k, v in fields.items()}


_CREATED = {
    "id": "batch_00000000002a0123456789ab",
    "owner": "0" * 32,
    "endpoint": "/v1/chat/completions",
    "input_file_id": "file-00000000002901234567890a",
    "input_key": "file-00000000002901234567890a",
    "completion_window": "24h",
    "status": "validating",
    "created_at": 1760000000,
    "expires_at": 1760086400,
    "total": 0,
    "completed": 0,
    "failed": 0,
    "metadata": '{"job":"nightly-eval","sluice_priority":"high"}',
    "output_expires_after": "",
    "provider": "",
    "reserved_lines": 10000,
    "priority": "high",
}
_RUNNING = {
    **_CREATED,
    "status": "in_progress",
    "in_progress_at": 1760000005,
    "total": 10000,
    "completed": 6123,
    "failed": 17,
    "model": "gpt-4o-mini",
    "feed_index": 6500,
    "feed_offset": 9876543,
    "feed_window": 1000,
    "usage_input": 1234567,
    "usage_cached": 1024,
    "usage_output": 456789,
    "usage_reasoning": 0,
    "fin_cursor": "1760000123456-0",
    "fin_out_bytes": 7654321,
    "fin_err_bytes": 12345,
    "fin_out_lines": 6100,
    "fin_err_lines": 17,
}
_COMPLETED = {
    **_RUNNING,
    "status": "completed",
    "completed": 9983,
    "failed": 17,
    "feed_index": 10000,
    "finalizing_at": 1760003600,
    "completed_at": 1760003601,
    "released": 1,
    "fin_out_file": "file-0000000000ff0123:255",
    "fin_err_file": "file-000000000100abcd:256",
    "output_file_id": "file-0000000000ff0123456789ab",
    "error_file_id": "file-000000000100abcdef012345",
    "webhook_url": "https://example.com/hook",
    "webhook_attempts": 1,
    "webhook_state": "delivered",
}
_FILE = {
    "id": "file-00000000002901234567890a",
    "owner": "0" * 32,
    "bytes": 12345678,
    "created_at": 1760000000,
    "filename": "input.jsonl",
    "purpose": "batch",
    "storage_key": "file-00000000002901234567890a",
    "expires_at": 1762592000,
    "lines": 10000,
    "charged": 1,
}


def _before_wire(raw: dict[bytes, bytes]) -> Batch:
    return _before_batch(_str(raw))


def _after_wire(raw: dict[bytes, bytes]) -> Batch:
    return store.batch_from_record(BatchRecord.from_hash(raw))


def _best(fns: list[Callable[[], object]], n: int, repeat: int) -> list[float]:
    """The best CPU time per call (µs) of each of ``fns`` over ``repeat`` rounds of ``n`` calls.

    CPU time of this process (not wall time) and the rounds of each interleaved with the others:
    on a busy machine, neither the time spent descheduled nor a burst of load favours one side.
    """
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            started = time.process_time()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.process_time() - started) / n)
    return [b * 1e6 for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="records decoded per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs of each; the best is kept")
    args = parser.parse_args()
    cases: list[
        tuple[
            str,
            dict[bytes, bytes],
            Callable[[], object],
            Callable[[], object],
            Callable[[], object],
            Callable[[], object],
        ]
    ] = []
    for name, fields in (
        ("batch, just created", _CREATED),
        ("batch, running", _RUNNING),
        ("batch, completed", _COMPLETED),
    ):
        raw = _raw(fields)
        cases.append(
            (
                name,
                raw,
                functools.partial(_str, raw),
                functools.partial(BatchRecord.from_hash, raw),
                functools.partial(_before_wire, raw),
                functools.partial(_after_wire, raw),
            )
        )
    raw = _raw(_FILE)
    cases.append(
        (
            "file",
            raw,
            lambda: _str(raw),
            lambda: FileRecord.from_hash(raw),
            lambda: _before_file(_str(raw)),
            lambda: store.file_from_record(FileRecord.from_hash(raw)),
        )
    )
    print(f"µs per record, best of {args.repeat} runs of {args.n}")
    print(f"{'record':<22}{'fields':>7}  {'decode before':>14}{'after':>8}  {'+ wire before':>14}{'after':>8}")
    for name, raw, rec_before, rec_after, wire_before, wire_after in cases:
        times = _best([rec_before, rec_after, wire_before, wire_after], args.n, args.repeat)
        print(f"{name:<22}{len(raw):>7}  {times[0]:>14.2f}{times[1]:>8.2f}  {times[2]:>14.2f}{times[3]:>8.2f}")


if __name__ == "__main__":
    main()
