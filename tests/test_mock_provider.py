"""Tests for the fake OpenAI-compatible upstream in service.devtools.mock_provider."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from service.devtools.mock_provider import create_app

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
# How long requests that must be in flight together are held: far longer than the few in-process
# steps the test takes meanwhile, even on a loaded machine.
HOLD_MS = 5000


async def post(client: Any, path: str, body: Any, **headers: str) -> tuple[int, Any, Any]:
    """POST exact bytes (so tests can hash them) and return (status, decoded body, headers)."""
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json", **headers})
    return resp.status, msgspec.json.decode(await resp.read()), resp.headers


async def stats(client: Any) -> dict[str, Any]:
    resp = await client.get("/_mock/stats")
    assert resp.status == 200
    return await resp.json()


async def wait_for_stats(client: Any, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /_mock/stats until predicate holds; fail with the last stats on timeout."""
    current: dict[str, Any] = {}

    async def poll() -> dict[str, Any]:
        nonlocal current
        while True:
            current = await stats(client)
            if predicate(current):
                return current
            await asyncio.sleep(0.005)

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        pytest.fail(f"condition not reached; last stats: {current}")


def assert_openai_error(body: Any, *, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    assert body["error"]["code"] == code


# ----------------------------------------------------------------------------- endpoints
async def test_chat_completion_echoes_last_message(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
    }
    raw = msgspec.json.encode(body)
    status, answer, headers = await post(client, CHAT, raw)

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["x-request-id"].startswith("req_") and len(headers["x-request-id"]) > 4
    assert answer["id"] == "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:16]
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "gpt-4o-mini"
    assert isinstance(answer["created"], int) and answer["created"] >= 1_700_000_000
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_structured_content_is_stringified(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    parts = [{"type": "text", "text": "hi"}]
    status, answer, _ = await post(client, CHAT, {"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == "echo: " + msgspec.json.encode(parts).decode()


async def test_same_body_gives_same_answer_on_both_path_forms(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    body = {"model": "m", "messages": [{"role": "user", "content": "same"}]}
    _, first, h1 = await post(client, CHAT, body)
    _, second, h2 = await post(client, CHAT, body)
    _, unprefixed, _ = await post(client, "/chat/completions", body)
    _, other, _ = await post(client, CHAT, {**body, "messages": [{"role": "user", "content": "different"}]})

    assert first == second == unprefixed
    assert other["id"] != first["id"]
    assert other["choices"][0]["message"]["content"] == "echo: different"
    # The body is deterministic; the request id identifies each individual request.
    assert h1["x-request-id"] != h2["x-request-id"]


async def test_completions_echo_prompt(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    status, answer, headers = await post(client, "/v1/completions", {"model": "babbage-002", "prompt": "once"})
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["model"] == "babbage-002"
    assert answer["choices"][0]["text"] == "echo: once"
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]

    _, listed, _ = await post(client, "/completions", {"model": "m", "prompt": ["upon", "a time"]})
    text = listed["choices"][0]["text"]
    assert text.startswith("echo: ") and "upon" in text and "a time" in text


async def test_embeddings_are_deterministic_per_item(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    status, answer, _ = await post(client, "/v1/embeddings", {"model": "emb", "input": ["a", "b", "a"]})
    assert status == 200
    assert answer["object"] == "list"
    assert answer["model"] == "emb"
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in answer["data"])
    vectors = [d["embedding"] for d in answer["data"]]
    assert all(len(v) == 8 and all(isinstance(x, float) and -1.0 <= x < 1.0 for x in v) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0

    # An item's vector does not depend on its neighbours or on how the input is wrapped.
    _, single, _ = await post(client, "/embeddings", {"model": "emb", "input": "a"})
    assert [d["embedding"] for d in single["data"]] == [vectors[0]]


async def test_embeddings_token_ids_and_base64(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    _, tokens, _ = await post(client, "/v1/embeddings", {"model": "emb", "input": [1, 2, 3]})
    assert len(tokens["data"]) == 1  # a flat token list is one input, as in the OpenAI API
    assert len(tokens["data"][0]["embedding"]) == 8

    _, floats, _ = await post(client, "/v1/embeddings", {"model": "emb", "input": "x"})
    _, packed, _ = await post(client, "/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "base64"})
    decoded = list(struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"])))
    assert decoded == floats["data"][0]["embedding"]


async def test_responses_echo_input(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    status, answer, _ = await post(client, "/v1/responses", {"model": "gpt-4.1", "input": "plain"})
    assert status == 200
    assert answer["object"] == "response"
    assert answer["id"].startswith("resp_")
    assert answer["status"] == "completed"
    assert answer["model"] == "gpt-4.1"
    assert answer["output"][0]["role"] == "assistant"
    assert answer["output"][0]["content"][0] == {"type": "output_text", "text": "echo: plain", "annotations": []}

    items = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "input_text", "text": "last one"}]},
    ]
    _, listed, _ = await post(client, "/responses", {"model": "gpt-4.1", "input": items})
    assert listed["output"][0]["content"][0]["text"] == "echo: last one"


async def test_moderations_never_flag(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    status, answer, headers = await post(client, "/v1/moderations", {"model": "omni-moderation-latest", "input": "x"})
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert answer["id"].startswith("modr-")
    assert answer["model"] == "omni-moderation-latest"
    assert answer["results"] == [{"flagged": False, "categories": {}, "category_scores": {}}]


# ----------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"[1, 2]", None),
        (b"not json", None),
        (b"", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 5}', "model"),
    ],
)
async def test_invalid_bodies_get_openai_400(aiohttp_client: Any, raw: bytes, param: str | None) -> None:
    client = await aiohttp_client(create_app())
    status, answer, headers = await post(client, CHAT, raw)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    assert_openai_error(answer, param=param)
    assert answer["error"]["type"] == "invalid_request_error"
    assert (await stats(client))["by_status"] == {"400": 1}


# ----------------------------------------------------------------------------- fault injection
async def test_mock_status_forces_error(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    status, answer, headers = await post(client, CHAT, {"model": "m", "mock_status": 503})
    assert status == 503
    assert_openai_error(answer, code="mock_error")
    assert answer["error"]["type"] == "server_error"
    assert "Retry-After" not in headers
    assert headers["x-request-id"].startswith("req_")

    status, answer, headers = await post(client, "/v1/embeddings", {"model": "m", "input": "x", "mock_status": 429})
    assert status == 429
    assert_openai_error(answer, code="mock_error")
    assert headers["Retry-After"] == "1"

    status, answer, _ = await post(client, CHAT, {"model": "m", "mock_status": 404})
    assert status == 404
    assert answer["error"]["type"] == "invalid_request_error"

    status, answer, _ = await post(client, CHAT, {"model": "m", "mock_status": "boom"})
    assert status == 400
    assert_openai_error(answer, param="mock_status")

    assert (await stats(client))["by_status"] == {"503": 1, "429": 1, "404": 1, "400": 1}


async def test_error_rate_one_fails_every_request_with_429_or_500(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(error_rate=1.0, seed=3))
    seen = []
    for i in range(30):
        status, answer, headers = await post(client, CHAT, {"model": "m", "messages": [{"content": str(i)}]})
        seen.append(status)
        assert "error" in answer
        if status == 429:
            assert headers["Retry-After"] == "1"
    assert set(seen) == {429, 500}

    # mock_status 200 is an explicit request for success and bypasses the error rate.
    status, answer, _ = await post(client, CHAT, {"model": "m", "mock_status": 200})
    assert status == 200
    assert answer["object"] == "chat.completion"


async def test_error_rate_sequence_is_reproducible_with_seed(aiohttp_client: Any) -> None:
    async def statuses(seed: int) -> list[int]:
        client = await aiohttp_client(create_app(error_rate=0.5, seed=seed))
        return [(await post(client, CHAT, {"model": "m"}))[0] for _ in range(30)]

    first, second = await statuses(11), await statuses(11)
    assert first == second
    assert {200, 429, 500} <= set(first)


async def test_mock_latency_overrides_global_latency(aiohttp_client: Any) -> None:
    # The global latency would outlast the test's timeout, so only the override lets it answer.
    client = await aiohttp_client(create_app(latency_ms=60_000))
    status, _, _ = await asyncio.wait_for(post(client, CHAT, {"model": "m", "mock_latency_ms": 0}), 20.0)
    assert status == 200

    status, answer, _ = await post(client, CHAT, {"model": "m", "mock_latency_ms": -1})
    assert status == 400
    assert_openai_error(answer, param="mock_latency_ms")


def test_create_app_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        create_app(error_rate=1.5)
    with pytest.raises(ValueError):
        create_app(latency_ms=-1)
    with pytest.raises(ValueError):
        create_app(max_concurrency=0)
    with pytest.raises(ValueError):
        create_app(rpm=0)
    with pytest.raises(ValueError):
        create_app(rpm=10, window_s=0)
    with pytest.raises(ValueError):
        create_app(rpm=50, window_s=1)  # 50 * 1 / 60 < 1: no request could ever pass


# ----------------------------------------------------------------------------- observation
async def test_in_flight_accounting_and_reset(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    body = {"model": "m", "mock_latency_ms": HOLD_MS}
    pending = [asyncio.create_task(post(client, CHAT, {**body, "n": i})) for i in range(5)]

    during = await wait_for_stats(client, lambda s: s["in_flight"] == 5)
    assert during["max_in_flight"] == 5
    assert during["requests"] == 5
    assert during["by_status"] == {}  # nothing has answered yet

    # A reset while requests are in flight keeps the live gauge and restarts the peak from it.
    resp = await client.post("/_mock/reset")
    assert resp.status == 200
    fresh = await resp.json()
    assert fresh["requests"] == 0
    assert fresh["in_flight"] == 5 and fresh["max_in_flight"] == 5
    assert fresh["paths"] == {} and fresh["authorization"] == []

    results = await asyncio.gather(*pending)
    assert [status for status, _, _ in results] == [200] * 5

    after = await stats(client)
    assert after["in_flight"] == 0
    assert after["max_in_flight"] == 5
    assert after["requests"] == 0
    assert after["by_status"] == {"200": 5}

    cleared = await (await client.post("/_mock/reset")).json()
    assert cleared == {
        "requests": 0,
        "batch_requests": 0,
        "accepted": 0,
        "rejected_429": 0,
        "first_request_at": None,
        "last_request_at": None,
        "in_flight": 0,
        "max_in_flight": 0,
        "by_status": {},
        "authorization": [],
        "paths": {},
    }


async def test_global_latency_keeps_requests_in_flight(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(latency_ms=HOLD_MS))
    pending = [asyncio.create_task(post(client, "/v1/embeddings", {"model": "m", "input": str(i)})) for i in range(3)]
    await wait_for_stats(client, lambda s: s["in_flight"] == 3)
    results = await asyncio.gather(*pending)
    assert [status for status, _, _ in results] == [200] * 3
    final = await stats(client)
    assert final["in_flight"] == 0 and final["max_in_flight"] == 3


async def test_stats_record_authorization_and_paths(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    await post(client, CHAT, {"model": "m"}, Authorization="Bearer sk-b")
    await post(client, CHAT, {"model": "m"}, Authorization="Bearer sk-a")
    await post(client, "/chat/completions", {"model": "m"}, Authorization="Bearer sk-b")
    await post(client, "/v1/moderations", {"model": "m", "input": "x"})
    await post(client, "/v1/embeddings", b"nope", Authorization="Bearer sk-c")

    current = await stats(client)
    assert current["requests"] == 5
    assert current["authorization"] == ["Bearer sk-a", "Bearer sk-b", "Bearer sk-c"]
    assert current["paths"] == {
        "/v1/chat/completions": 2,
        "/chat/completions": 1,
        "/v1/moderations": 1,
        "/v1/embeddings": 1,
    }
    assert current["by_status"] == {"200": 4, "400": 1}
    assert current["in_flight"] == 0 and current["max_in_flight"] == 1

    # Observation endpoints are not API traffic and do not count themselves.
    assert (await stats(client))["requests"] == 5


# ----------------------------------------------------------------------------- provider limits
async def test_concurrency_limit_rejects_at_once_and_not_in_flight(aiohttp_client: Any) -> None:
    # An accepted request without mock_latency_ms would sleep a minute, so an answer to the
    # extra request proves the rejection came before the latency sleep.
    client = await aiohttp_client(create_app(latency_ms=60_000, max_concurrency=2))
    holders = [
        asyncio.create_task(post(client, CHAT, {"model": "m", "mock_latency_ms": HOLD_MS, "n": i})) for i in range(2)
    ]
    await wait_for_stats(client, lambda s: s["in_flight"] == 2)

    status, answer, headers = await asyncio.wait_for(post(client, CHAT, {"model": "m"}, Authorization="Bearer x"), 20.0)
    assert status == 429
    assert_openai_error(answer, code="concurrency_limit_exceeded")
    assert answer["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == "1"
    assert headers["x-request-id"].startswith("req_")

    # The limit is checked before the body is read: even a malformed body gets the 429.
    status, answer, _ = await post(client, CHAT, b"not json")
    assert status == 429 and answer["error"]["code"] == "concurrency_limit_exceeded"

    during = await stats(client)
    assert during["in_flight"] == 2 and during["max_in_flight"] == 2
    assert during["requests"] == 4 and during["accepted"] == 2 and during["rejected_429"] == 2
    assert during["by_status"] == {"429": 2}
    assert during["authorization"] == ["Bearer x"]  # rejected requests still reached the upstream

    assert [status for status, _, _ in await asyncio.gather(*holders)] == [200, 200]
    # With the slots free again a request is accepted.
    status, _, _ = await post(client, CHAT, {"model": "m", "mock_latency_ms": 0})
    assert status == 200
    final = await stats(client)
    assert final["max_in_flight"] == 2 and final["in_flight"] == 0
    assert final["accepted"] == 3 and final["rejected_429"] == 2
    assert final["by_status"] == {"200": 3, "429": 2}


async def test_no_retry_after_leaves_the_header_off_every_429(aiohttp_client: Any) -> None:
    client = await aiohttp_client(
        create_app(latency_ms=60_000, max_concurrency=1, error_rate=1.0, seed=3, retry_after=False)
    )
    holder = asyncio.create_task(post(client, CHAT, {"model": "m", "mock_latency_ms": 300, "mock_status": 200}))
    await wait_for_stats(client, lambda s: s["in_flight"] == 1)
    status, answer, headers = await post(client, CHAT, {"model": "m"})
    assert status == 429 and answer["error"]["code"] == "concurrency_limit_exceeded"
    assert "Retry-After" not in headers
    assert (await holder)[0] == 200
    status, answer, headers = await post(client, CHAT, {"model": "m", "mock_status": 429, "mock_latency_ms": 0})
    assert status == 429 and answer["error"]["code"] == "mock_error" and "Retry-After" not in headers


async def test_rpm_retry_after_counts_until_oldest_leaves_window(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(rpm=2))  # default 60 s window: 2 requests per minute
    assert [(await post(client, CHAT, {"model": "m", "n": i}))[0] for i in range(2)] == [200, 200]
    # Forcing success with mock_status does not get past a provider limit.
    status, answer, headers = await post(client, CHAT, {"model": "m", "mock_status": 200})
    assert status == 429
    assert_openai_error(answer, code="rate_limit_exceeded")
    assert answer["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == "60"  # ceil of just under 60 s
    assert headers["x-request-id"].startswith("req_")
    current = await stats(client)
    assert current["accepted"] == 2 and current["rejected_429"] == 1
    assert current["by_status"] == {"200": 2, "429": 1}


async def test_rpm_short_window_rejects_then_accepts_after_slide(aiohttp_client: Any) -> None:
    window_s = 0.6
    client = await aiohttp_client(create_app(rpm=300, window_s=window_s))  # floor(300 * 0.6 / 60) = 3
    started = time.monotonic()
    assert [(await post(client, CHAT, {"model": "m", "n": i}))[0] for i in range(3)] == [200] * 3

    status, answer, headers = await post(client, CHAT, {"model": "m"})
    assert status == 429
    assert_openai_error(answer, code="rate_limit_exceeded")
    assert headers["Retry-After"] == "1"  # under a second rounds up to the minimum of 1

    # Retry (bounded) until the oldest request has left the window and a slot frees up.
    async def retry_until_accepted() -> int:
        attempts = 0
        while True:
            attempts += 1
            if (await post(client, CHAT, {"model": "m"}))[0] == 200:
                return attempts
            await asyncio.sleep(0.02)

    attempts = await asyncio.wait_for(retry_until_accepted(), 30.0)  # a failure deadline: 0.6 s is expected
    # Nothing was accepted before the first request's window had fully passed.
    assert time.monotonic() - started >= window_s

    current = await stats(client)
    assert current["accepted"] == 4
    assert current["rejected_429"] == attempts  # the first 429 plus attempts - 1 retries
    assert current["requests"] == 4 + attempts
    assert current["by_status"] == {"200": 4, "429": attempts}
    assert current["max_in_flight"] == 1 and current["in_flight"] == 0


async def test_rpm_fractional_allowance_is_floored(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(rpm=90, window_s=1))  # 1.5 per second -> 1
    assert (await post(client, CHAT, {"model": "m"}))[0] == 200
    assert (await post(client, CHAT, {"model": "m"}))[0] == 429


async def test_limits_stats_fields_and_reset(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(rpm=3))
    fresh = await stats(client)
    assert fresh["accepted"] == 0 and fresh["rejected_429"] == 0
    assert fresh["first_request_at"] is None and fresh["last_request_at"] is None

    before = time.time()
    # An injected 429 and a 400 still passed the limits: accepted, not counted as rejections.
    assert (await post(client, CHAT, {"model": "m", "mock_status": 429}))[0] == 429
    assert (await post(client, CHAT, b"nope"))[0] == 400
    assert (await post(client, CHAT, {"model": "m"}))[0] == 200
    after = time.time()
    assert (await post(client, CHAT, {"model": "m"}))[0] == 429  # fourth within the minute

    current = await stats(client)
    assert current["requests"] == 4 and current["accepted"] == 3 and current["rejected_429"] == 1
    assert current["by_status"] == {"429": 2, "400": 1, "200": 1}
    # The rejection did not move last_request_at.
    assert before <= current["first_request_at"] <= current["last_request_at"] <= after

    cleared = await (await client.post("/_mock/reset")).json()
    assert cleared["requests"] == cleared["accepted"] == cleared["rejected_429"] == 0
    assert cleared["first_request_at"] is None and cleared["last_request_at"] is None
    assert cleared["by_status"] == {}

    # The reset emptied the rate window, so the full allowance is available again.
    assert [(await post(client, CHAT, {"model": "m", "n": i}))[0] for i in range(4)] == [200, 200, 200, 429]
    refilled = await stats(client)
    assert refilled["accepted"] == 3 and refilled["rejected_429"] == 1
    assert refilled["first_request_at"] >= after


async def test_no_limits_by_default(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app())
    pending = [asyncio.create_task(post(client, CHAT, {"model": "m", "n": i})) for i in range(20)]
    assert {status for status, _, _ in await asyncio.gather(*pending)} == {200}
    current = await stats(client)
    assert current["accepted"] == 20 and current["rejected_429"] == 0


# ----------------------------------------------------------------------------- run()
async def test_run_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from service.devtools.mock_provider import run; run(0)",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        prefix = "mock provider listening on http://127.0.0.1:"
        assert line.startswith(prefix), line
        base_url = line.removeprefix("mock provider listening on ")
        assert int(base_url.rsplit(":", 1)[1]) > 0

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base_url}/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["object"] == "chat.completion"

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_mock_fail_times_makes_a_fault_transient(aiohttp_client):
    client = await aiohttp_client(create_app())
    body = {"model": "m", "messages": [{"role": "user", "content": "flaky"}], "mock_status": 503, "mock_fail_times": 2}
    statuses = []
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=body)
        statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    other = await client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]})
    assert other.status == 503
