"""Token usage on batches, by token and day (``GET /v1/sluice/usage``, ``sluice usage``) and in ``/metrics``.

Executed and delegated lines count alike: a mixed batch runs its ``exec-*`` lines one by one and
hands the rest to the mock's Batch API.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CONFIG = """
[providers.exec]
base_url = "${mock_url}"
models = ["exec-*"]

[providers.batchy]
base_url = "${mock_url}"
models = ["*"]
batch_api = "delegate"
batch_poll_s = 0.2
batch_poll_max_s = 0.5
"""


def _sum(lines: list[dict]) -> dict[tuple[str, str], list[int]]:
    """(provider, model) -> [lines, input, output] summed over output-file lines (provider told by the model)."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for line in lines:
        body = line["response"]["body"]
        provider = "exec" if body["model"].startswith("exec-") else "batchy"
        s = sums[(provider, body["model"])]
        s[0] += 1
        s[1] += body["usage"].get("prompt_tokens", 0)
        s[2] += body["usage"].get("completion_tokens", 0)
    return dict(sums)


def test_usage_equals_the_sum_over_the_output_files(stack_factory):
    stack = stack_factory.start(name="usage", workers=1, upstream=False, config_toml=CONFIG)
    client = stack.client(stack.tokens[1])  # strict: Batch.usage must parse as openai's BatchUsage
    run = uuid.uuid4().hex[:8]
    rows = [
        stack.chat_line(f"u-{run}-{i}", f"{'tell me ' * i}{run}", model="exec-small" if i % 2 else "gpt-4o-mini")
        for i in range(16)
    ]
    rows += [stack.chat_line(f"u-{run}-bad-{i}", "nope", model="exec-small", mock_status=400) for i in range(2)]
    _, created = stack.submit(rows, client=client)
    chat = stack.wait_for_batch(created.id, client=client, timeout=90)
    assert chat.status == "completed" and chat.request_counts.failed == 2, chat
    embed_rows = [
        {
            "custom_id": f"e-{run}-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "exec-embed", "input": ["some words"] * (i + 1)},
        }
        for i in range(4)
    ]
    _, created = stack.submit(embed_rows, client=client, endpoint="/v1/embeddings")
    embed = stack.wait_for_batch(created.id, client=client, timeout=90)
    assert embed.status == "completed", embed

    expected: dict[tuple[str, str], list[int]] = {}
    for batch in (chat, embed):
        output, _ = stack.results(batch, client=client)
        sums = _sum(output)
        tokens_in = sum(s[1] for s in sums.values())
        tokens_out = sum(s[2] for s in sums.values())
        assert tokens_in > 0
        usage = batch.usage
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
            tokens_in,
            tokens_out,
            tokens_in + tokens_out,
        )
        assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
        expected.update(sums)
    assert set(expected) == {("exec", "exec-small"), ("batchy", "gpt-4o-mini"), ("exec", "exec-embed")}
    # The other token sees the batch's usage nowhere.
    assert stack.client().batches.list().data == []

    report = stack.http("GET", "/v1/sluice/usage?days=2", token=stack.tokens[1]).json()
    got = {(r["provider"], r["model"]): [r["requests"], r["input_tokens"], r["output_tokens"]] for r in report["data"]}
    assert got == expected, report
    for r in report["data"]:
        assert r["total_tokens"] == r["input_tokens"] + r["output_tokens"] and r["date"] == report["end_date"]
    assert stack.http("GET", "/v1/sluice/usage", token=stack.tokens[0]).json()["data"] == []

    cli = stack.sluice(
        "usage", "--json", "--days", "2", "--url", stack.base_url, "--token", stack.tokens[1], check=True
    )
    assert json.loads(cli.stdout)["data"] == report["data"]
    table = stack.sluice("usage", "--url", stack.base_url, "--token", stack.tokens[1], check=True).stdout
    assert "gpt-4o-mini" in table and "batchy" in table and table.splitlines()[-1].startswith("total")

    metrics = stack.http("GET", "/metrics", token=None).body.decode()
    for (provider, model), (lines, tokens_in, tokens_out) in expected.items():
        assert f'sluice_tokens_total{{model="{model}",provider="{provider}",type="input"}} {tokens_in}.0' in metrics
        if tokens_out:  # embeddings have none; a zero is never counted
            assert (
                f'sluice_tokens_total{{model="{model}",provider="{provider}",type="output"}} {tokens_out}.0' in metrics
            )
        assert f'sluice_usage_lines_total{{model="{model}",provider="{provider}"}} {lines}.0' in metrics
