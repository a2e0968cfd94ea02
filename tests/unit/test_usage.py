"""Token usage: what is read from response bodies, and the ``GET /v1/sluice/usage`` endpoint's edges."""

from __future__ import annotations

import json

import pytest

from service.core import usage

from .conftest import NO_AUTH


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            {
                "model": "gpt-4o",
                "usage": {
                    "prompt_tokens": 11,
                    "completion_tokens": 7,
                    "total_tokens": 18,
                    "prompt_tokens_details": {"cached_tokens": 3},
                    "completion_tokens_details": {"reasoning_tokens": 2},
                },
            },
            "11 3 7 2 p|gpt-4o",
        ),
        (
            {
                "model": "o3",
                "usage": {
                    "input_tokens": 5,
                    "output_tokens": 9,
                    "input_tokens_details": {"cached_tokens": 1},
                    "output_tokens_details": {"reasoning_tokens": 4},
                },
            },
            "5 1 9 4 p|o3",
        ),
        (
            {"model": "text-embedding-3-small", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
            "8 0 0 0 p|text-embedding-3-small",
        ),
        ({"model": "a|b", "usage": {"prompt_tokens": 1}}, "1 0 0 0 p|a_b"),
        (
            {"usage": {"prompt_tokens": -4, "completion_tokens": "many", "prompt_tokens_details": None}},
            "0 0 0 0 p|unknown",
        ),
        ({"model": "m"}, ""),
        ({"model": "m", "usage": None}, ""),
        ({"model": "m", "usage": [1, 2]}, ""),
        ([1, 2], ""),
    ],
)
def test_usage_is_read_from_the_body_and_garbage_is_harmless(body, expected):
    assert usage.from_body("p", json.dumps(body).encode()) == expected


def test_usage_of_a_result_line_and_of_broken_ones():
    line = {
        "id": "batch_req_1",
        "custom_id": "c",
        "error": None,
        "response": {"status_code": 200, "request_id": "r", "body": {"model": "m", "usage": {"prompt_tokens": 2}}},
    }
    assert usage.from_result_line("prov", json.dumps(line).encode()) == "2 0 0 0 prov|m"
    for broken in (b"not json", b"{}", b'{"response": null}', b'{"response": {"body": 3}}', b"\xff"):
        assert usage.from_result_line("prov", broken) == ""


async def test_usage_endpoint_answers_an_empty_report_and_checks_days(api):
    report = (await api.request("GET", "/v1/sluice/usage")).ok()
    assert report["object"] == "list" and report["data"] == [] and report["has_more"] is False
    assert report["start_date"] <= report["end_date"]
    assert (await api.request("GET", "/sluice/usage", params={"days": "30"})).ok()["data"] == []
    (await api.request("GET", "/v1/sluice/usage", params={"days": "0"})).error(400, param="days", code="invalid_value")
    (await api.request("GET", "/v1/sluice/usage", params={"days": "x"})).error(400, param="days", code="invalid_type")
    (await api.request("GET", "/v1/sluice/usage", token=NO_AUTH)).error(401, code="invalid_api_key")


async def test_a_line_recorded_twice_counts_its_tokens_once():
    import fakeredis

    from service.core import keys, store
    from service.core.records import BatchRecord

    r = fakeredis.FakeAsyncRedis()
    await r.hset(keys.batch("batch_u"), mapping={"owner": "owner1", "completed": 0, "failed": 0})
    await r.xgroup_create(keys.results("batch_u"), "finalizer", id="0", mkstream=True)
    first = [
        (0, "", "completed", b'{"custom_id": "a"}', "10 2 5 1 prov|model-x"),
        (1, "", "failed", b'{"custom_id": "b"}', ""),
    ]
    assert await store.record_results(r, "batch_u", first) == 2
    # A redelivery of line 0 (with its usage) and a new line 2 in one call: only line 2 counts.
    again = [first[0], (2, "", "completed", b'{"custom_id": "c"}', "1 0 1 0 prov|model-x")]
    assert await store.record_results(r, "batch_u", again) == 1
    b = store.batch_from_record(
        BatchRecord.from_hash(
            await r.hgetall(keys.batch("batch_u"))
            | {
                b"id": b"batch_u",
                b"endpoint": b"/v1/chat/completions",
                b"input_file_id": b"f",
                b"completion_window": b"24h",
                b"status": b"in_progress",
                b"created_at": b"1",
            }
        )
    )
    assert (
        b.usage.input_tokens,
        b.usage.input_tokens_details.cached_tokens,
        b.usage.output_tokens,
        b.usage.output_tokens_details.reasoning_tokens,
        b.usage.total_tokens,
    ) == (11, 2, 6, 1, 17)
    # The day's usage and the token counters live in the batch's shard; the report sums the shards.
    shard = keys.shard_of("batch_u")
    day_keys = await r.keys(keys.usage_day(shard, "*"))
    assert len(day_keys) == 1 and await r.ttl(day_keys[0]) > 0
    rows, _, _ = await usage.report(r, "owner1", 2)  # 2 days: the recording may have been just before midnight
    assert [(u.provider, u.model, u.requests, u.input_tokens, u.output_tokens) for u in rows] == [
        ("prov", "model-x", 2, 11, 6)
    ]
    assert (rows[0].input_tokens_details.cached_tokens, rows[0].output_tokens_details.reasoning_tokens) == (2, 1)
    assert (await usage.report(r, "owner2", 2))[0] == []
    tokens = {k.decode(): int(v) for k, v in (await r.hgetall(keys.metrics_tokens(shard))).items()}
    assert tokens["prov|model-x|input"] == 11 and tokens["prov|model-x|requests"] == 2
    # The old four-field results (abort lines, poison lines) still record, without usage.
    assert await store.record_results(r, "batch_u", [(3, "", "failed", b'{"custom_id": "d"}')]) == 1
