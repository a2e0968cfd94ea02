"""Token usage: what is read from response bodies, and the ``GET /v1/sluice/usage`` endpoint's edges."""

from __future__ import annotations

import json

import pytest

from service.core import usage

from .conftest import NO_AUTH


@pytest.mark.parametrize("body, expected", [
    ({"model": "gpt-4o", "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                                   "prompt_tokens_details": {"cached_tokens": 3},
                                   "completion_tokens_details": {"reasoning_tokens": 2}}}, "11 3 7 2 p|gpt-4o"),
    ({"model": "o3", "usage": {"input_tokens": 5, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 1},
                               "output_tokens_details": {"reasoning_tokens": 4}}}, "5 1 9 4 p|o3"),
    ({"model": "text-embedding-3-small", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
     "8 0 0 0 p|text-embedding-3-small"),
    ({"model": "a|b", "usage": {"prompt_tokens": 1}}, "1 0 0 0 p|a_b"),
    ({"usage": {"prompt_tokens": -4, "completion_tokens": "many", "prompt_tokens_details": None}}, "0 0 0 0 p|unknown"),
    ({"model": "m"}, ""),
    ({"model": "m", "usage": None}, ""),
    ({"model": "m", "usage": [1, 2]}, ""),
    ([1, 2], ""),
])
def test_usage_is_read_from_the_body_and_garbage_is_harmless(body, expected):
    assert usage.from_body("p", json.dumps(body).encode()) == expected


def test_usage_of_a_result_line_and_of_broken_ones():
    line = {"id": "batch_req_1", "custom_id": "c", "error": None,
            "response": {"status_code": 200, "request_id": "r", "body": {"model": "m", "usage": {"prompt_tokens": 2}}}}
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
