"""Batch and file records decode once from a raw Redis hash, whatever version of Sluice wrote it."""

from __future__ import annotations

import msgspec
import pytest

from service.core.records import BatchField, BatchRecord, FileField, FileRecord, field_names
from service.core.wire import BatchError


def _raw(**fields: object) -> dict[bytes, bytes]:
    return {k.encode(): str(v).encode() for k, v in fields.items()}


def test_a_batch_record_decodes_its_fields_to_their_types():
    rec = BatchRecord.from_hash(
        _raw(
            id="batch_1",
            owner="o",
            endpoint="/v1/chat/completions",
            input_file_id="file-1",
            input_key="k",
            completion_window="24h",
            status="in_progress",
            created_at=100,
            expires_at=86500,
            total=10,
            completed=4,
            failed=1,
            metadata='{"job":"a"}',
            reserved_lines=10,
            released=1,
            byok_used=1,
            in_progress_at=101,
            feed_index=5,
            feed_offset=512,
            deleg_providers='["p1","p2"]',
            usage_input=7,
            usage_cached=2,
            errors='[{"code":"invalid_json","message":"bad","param":null,"line":3}]',
            fin_cursor="1-0",
        )
    )
    assert (rec.id, rec.status, rec.created_at, rec.expires_at, rec.in_progress_at) == (
        "batch_1",
        "in_progress",
        100,
        86500,
        101,
    )
    assert (rec.total, rec.completed, rec.failed, rec.reserved_lines) == (10, 4, 1, 10)
    assert rec.metadata == {"job": "a"}
    assert rec.released is True and rec.byok_used is True
    assert (rec.feed_index, rec.feed_offset, rec.fin_cursor) == (5, 512, "1-0")
    assert rec.deleg_providers == frozenset({"p1", "p2"})
    assert (rec.usage_input, rec.usage_cached, rec.usage_output) == (7, 2, 0)
    assert rec.errors == [BatchError(code="invalid_json", message="bad", line=3)]
    assert rec.all_done is False and rec.started is True


def test_missing_fields_take_their_defaults():
    # What an HMGET of a few fields gives, or a record written before a field existed.
    rec = BatchRecord.from_hash({b"owner": b"o"})
    assert rec.owner == "o" and rec.id == "" and rec.status is None
    assert (rec.total, rec.completed, rec.deleg_open, rec.webhook_attempts) == (0, 0, 0, 0)
    assert rec.expires_at is None and rec.in_progress_at is None and rec.feed_index is None
    assert rec.metadata is None and rec.errors is None and rec.deleg_providers == frozenset()
    assert rec.released is False and rec.started is False
    assert BatchRecord.from_hash({}) == BatchRecord()


def test_empty_values_are_unset_options():
    # create_batch writes an unset option as "" (it is a field of the hash all the same).
    rec = BatchRecord.from_hash(
        _raw(id="batch_1", status="validating", output_expires_after="", metadata="", provider="", expires_at=5)
    )
    assert rec.output_expires_after is None and rec.metadata is None and rec.provider == "" and rec.expires_at == 5


def test_unknown_fields_are_ignored():
    # A record written by a newer version, or a field this one no longer reads.
    raw = _raw(id="batch_1", status="completed", total=3, some_future_field="x", another={"a": 1})
    rec = BatchRecord.from_hash(raw)
    assert (rec.id, rec.status, rec.total) == ("batch_1", "completed", 3)
    assert not hasattr(rec, "some_future_field")


def test_from_values_reads_an_hmget():
    names = (BatchField.STATUS, BatchField.TOTAL, BatchField.ABORT, BatchField.FEED_INDEX)
    rec = BatchRecord.from_values(names, [b"in_progress", b"12", None, b"0"])
    assert (rec.status, rec.total, rec.abort, rec.feed_index) == ("in_progress", 12, "", 0)
    assert rec.started  # feed_index 0 is a started batch, unlike a missing one


def test_a_value_of_the_wrong_type_is_an_error_not_a_silent_default():
    with pytest.raises(msgspec.ValidationError):
        BatchRecord.from_hash(_raw(total="many"))
    with pytest.raises(msgspec.ValidationError):
        BatchRecord.from_hash(_raw(status="exploded"))


def test_a_file_record_decodes_and_tolerates_missing_and_unknown_fields():
    rec = FileRecord.from_hash(
        _raw(
            id="file-1",
            owner="o",
            bytes=123,
            created_at=9,
            filename="in.jsonl",
            purpose="batch",
            storage_key="file-1",
            expires_at="",
            lines=4,
            charged=1,
            later_field="z",
        )
    )
    assert (rec.id, rec.bytes, rec.created_at, rec.expires_at, rec.lines, rec.charged) == (
        "file-1",
        123,
        9,
        None,
        4,
        True,
    )
    assert FileRecord.from_hash(_raw(id="file-2", expires_at=77)).expires_at == 77
    assert FileRecord.from_hash({b"bytes": b"5"}) == FileRecord(bytes=5)


@pytest.mark.parametrize("names, record", [(BatchField, BatchRecord), (FileField, FileRecord)])
def test_every_field_name_constant_is_an_attribute_of_its_record(names, record):
    assert field_names(names) <= set(record.__struct_fields__)
