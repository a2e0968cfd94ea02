"""Garbage batch creation: ``POST /v1/batches`` with garbage JSON bodies and content types.

See ``harness.py`` for the guarantee under test and how an example runs.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from ..conftest import (
    BATCH_FIELDS,
    CHAT,
    MODEL,
)
from .harness import (
    BATCH_ENDPOINTS,
    COMMON_SETTINGS,
    CREATE_FIELDS,
    GOOD_BATCH,
    GOOD_FILE,
    MAX_JSON_BODY,
    OTHER_FILE,
    TEXT,
    assert_client_error,
    deep,
    huge_strings,
    json_object_verdict,
    json_values,
)

# --------------------------------------------------------------------------------------------
# 3. POST /v1/batches with garbage JSON bodies and content types


def create_verdict(body: Any) -> str:
    """'ok' (must be created), 'bad' (must be refused) or 'either' for a decoded create body."""
    if not isinstance(body, dict):
        return "bad"
    if any(k not in CREATE_FIELDS for k in body):
        return "bad"
    if body.get("input_file_id") != GOOD_FILE:
        return "bad"
    if body.get("endpoint") not in BATCH_ENDPOINTS or body.get("completion_window") not in ("24h", "1h"):
        return "bad"
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            return "bad"
        if any(len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in metadata.items()):
            return "bad"
    oea = body.get("output_expires_after")
    verdict = "ok"
    if oea is not None:
        if not isinstance(oea, dict) or oea.get("anchor") != "created_at":
            return "bad"
        seconds = oea.get("seconds")
        if isinstance(seconds, int) and not isinstance(seconds, bool):
            if not 3600 <= seconds <= 2592000:
                return "bad"
        elif isinstance(seconds, (float, str)):
            verdict = "either"  # "3600" / 3600.0: leniency is acceptable
        else:
            return "bad"
        if set(oea) - {"anchor", "seconds"}:
            verdict = "either"
    return verdict


create_values = {
    "input_file_id": st.sampled_from(
        [GOOD_FILE, GOOD_FILE, OTHER_FILE, GOOD_BATCH, "", "file-" + "0" * 24, None, 5, [], "../file", "file-\x00"]
    )
    | st.text(TEXT, max_size=30)
    | huge_strings,
    "endpoint": st.sampled_from(
        BATCH_ENDPOINTS + (CHAT, CHAT, "", "/v1/chat/completions/", "/V1/CHAT/COMPLETIONS", None, 7)
    )
    | st.text(TEXT, max_size=20),
    "completion_window": st.sampled_from(["24h", "24h", "24h", "1h", "24H", "", None, 24, "24h "]),
    "metadata": st.none()
    | st.dictionaries(st.text(TEXT, max_size=70), st.text(TEXT, max_size=20) | json_values, max_size=18)
    | json_values,
    "output_expires_after": st.none()
    | st.fixed_dictionaries(
        {
            "anchor": st.sampled_from(["created_at", "created_at", "now", None, 1]),
            "seconds": st.sampled_from(
                [
                    3600,
                    7200,
                    2592000,
                    3599,
                    2592001,
                    0,
                    -1,
                    "3600",
                    3600.0,
                    3600.5,
                    True,
                    None,
                    [],
                    10**30,
                    "1e999",
                    "x",
                ]
            ),
        }
    )
    | json_values,
}


@st.composite
def near_valid_create(draw) -> dict:
    body = {}
    for name, values in create_values.items():
        if draw(st.integers(0, 9)) == 0 and name in ("input_file_id", "endpoint", "completion_window"):
            continue  # missing required field
        if name in ("metadata", "output_expires_after") and draw(st.booleans()):
            continue
        body[name] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(TEXT, max_size=20))] = draw(json_values)
    return body


random_objects = st.dictionaries(st.sampled_from(CREATE_FIELDS) | st.text(TEXT, max_size=20), json_values, max_size=6)
json_content_types = st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8", "application/vnd.openai+json", None]
)
bad_content_types = st.sampled_from(
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/jsonl",
        "application/octet-stream",
        "text/json",
    ]
)


@dataclass
class CreateCase:
    content_type: str | None
    json_body: Any = None  # encoded by the test (after id sentinels are resolved)
    raw: bytes | None = None  # sent as-is


create_cases = st.one_of(
    st.builds(CreateCase, json_content_types, near_valid_create()),
    st.builds(CreateCase, json_content_types, random_objects),
    st.builds(CreateCase, json_content_types, json_values),
    st.builds(CreateCase, bad_content_types, near_valid_create()),
    st.builds(
        CreateCase,
        json_content_types | bad_content_types | st.text(string.ascii_letters + "/+;=-", max_size=30),
        st.none(),
        st.binary(max_size=300),
    ),
)
_valid_create = {"input_file_id": GOOD_FILE, "endpoint": CHAT, "completion_window": "24h"}


@settings(max_examples=120, **COMMON_SETTINGS)
@given(case=create_cases)
@example(case=CreateCase("application/json", dict(_valid_create)))
@example(case=CreateCase("application/json", {**_valid_create, "endpoint": "/v1/embeddings", "metadata": {"k": "v"}}))
@example(case=CreateCase("application/json", {**_valid_create, "input_file_id": "x" * (2 * MAX_JSON_BODY)}))
@example(case=CreateCase("application/json", {**_valid_create, "input_file_id": "x" * 500_000}))
@example(case=CreateCase("application/json", {**_valid_create, "metadata": {"k": "v" * 100_000}}))
@example(case=CreateCase("text/plain", dict(_valid_create)))
@example(case=CreateCase("application/json", None, b"not json at all"))
@example(case=CreateCase("application/json", None, b""))
@example(case=CreateCase("application/json", None, deep(10_000).encode()))
@example(case=CreateCase("application/json", None, b'{"input_file_id": "\xff"}'))
def test_create_batch_garbage_bodies(h, case):
    """POST /v1/batches: a created batch that validates correctly, or a clear 4xx."""
    if case.raw is not None:
        payload = case.raw
        verdict = "bad" if json_object_verdict(payload.strip()) != "object" else "either"
    else:
        payload = json.dumps(h.resolve(case.json_body)).encode()
        verdict = create_verdict(case.json_body)
    ct = case.content_type
    if ct is not None and ct.split(";")[0].strip() not in ("application/json", "application/vnd.openai+json"):
        verdict = (
            "bad"
            if ct
            in (
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "application/jsonl",
                "application/octet-stream",
                "text/json",
            )
            else "either"
        )
    verdict_before_size = verdict
    if len(payload) > MAX_JSON_BODY:
        verdict = "bad"
    note(f"verdict {verdict}, {len(payload)} bytes")

    async def body():
        kwargs: dict[str, Any] = {"data": payload}
        if ct is None:
            kwargs["skip_auto_headers"] = ("Content-Type",)
        else:
            kwargs["headers"] = {"Content-Type": ct}
        resp = await h.api.request("POST", "/v1/batches", **kwargs)
        if resp.status != 200:
            assert verdict != "ok", f"a valid create was refused: {resp.status} {resp.body[:400]!r}"
            err = assert_client_error(resp, {400, 404, 413})
            if len(payload) > MAX_JSON_BODY and verdict_before_size != "bad":
                assert resp.status == 413, err
            return
        assert verdict != "bad", f"an invalid create was accepted: {resp.body[:400]!r}"
        batch = resp.json()
        sent = json.loads(payload)
        assert set(batch) == BATCH_FIELDS, batch
        assert batch["status"] == "validating" and batch["object"] == "batch", batch
        assert batch["input_file_id"] == h.good_file["id"] and batch["endpoint"] == sent["endpoint"]
        assert batch["completion_window"] == sent["completion_window"] and batch["metadata"] == sent.get("metadata")
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        done = await h.wait_validated(batch["id"])
        if sent["endpoint"] == CHAT:
            assert done["status"] == "in_progress", done
            assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
            assert done["model"] == MODEL
        else:  # the seeded lines target chat completions
            assert done["status"] == "failed", done
            assert [(e["code"], e["line"]) for e in done["errors"]["data"]] == [("invalid_url", 1), ("invalid_url", 2)]

    h.example(body)
