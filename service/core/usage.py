"""Token usage: read from each successful line's response body, counted once, reported by day.

A line's usage travels with its result to the script that records it (``store._RECORD``), which
adds it to the batch (``usage_*`` fields: ``Batch.usage``), to the day's usage of the batch's
token (``keys.usage_day``: ``GET /v1/sluice/usage``, ``sluice usage``) and to the cluster's
counters (``keys.metrics_tokens``: ``/metrics``), both in the batch's shard, only when the line is
newly recorded: a line delivered twice is counted once. Readers sum the shards.

The response shapes: chat completions and completions (``prompt_tokens``, ``completion_tokens``,
``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``), responses
(``input_tokens``, ``output_tokens``, ``input_tokens_details``, ``output_tokens_details``) and
embeddings (``prompt_tokens`` only).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from . import keys
from .store import Redis
from .wire import JSON_ERRORS, InputTokensDetails, OutputTokensDetails, UsageRow

KINDS = ("input", "cached", "output", "reasoning")
MAX_MODEL_CHARS = 128


class _Usage(msgspec.Struct):
    prompt_tokens: Any = None
    completion_tokens: Any = None
    input_tokens: Any = None
    output_tokens: Any = None
    prompt_tokens_details: Any = None
    completion_tokens_details: Any = None
    input_tokens_details: Any = None
    output_tokens_details: Any = None


class _Body(msgspec.Struct):
    model: Any = None
    usage: _Usage | None = None


class _Response(msgspec.Struct):
    body: _Body | None = None


class _ResultLine(msgspec.Struct):
    response: _Response | None = None


# Only the fields above are decoded; the rest of a body (choices, embeddings) is skipped.
_body_decoder = msgspec.json.Decoder(_Body)
_line_decoder = msgspec.json.Decoder(_ResultLine)


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _detail(details: Any, name: str) -> int:
    return _n(details.get(name)) if isinstance(details, dict) else 0


def _label(value: str) -> str:
    # '|' separates the parts of a counter's name; a model or provider name must not carry one.
    return value.replace("|", "_")[:MAX_MODEL_CHARS] or "unknown"


def _encode(provider: str, body: _Body | None) -> str:
    if body is None or body.usage is None:
        return ""
    u = body.usage
    tokens_in = _n(u.input_tokens) or _n(u.prompt_tokens)
    tokens_out = _n(u.output_tokens) or _n(u.completion_tokens)
    cached = _detail(u.input_tokens_details, "cached_tokens") or _detail(u.prompt_tokens_details, "cached_tokens")
    reasoning = _detail(u.output_tokens_details, "reasoning_tokens") or _detail(
        u.completion_tokens_details, "reasoning_tokens"
    )
    model = body.model if isinstance(body.model, str) else ""
    return f"{tokens_in} {cached} {tokens_out} {reasoning} {_label(provider)}|{_label(model)}"


def from_body(provider: str, body: bytes) -> str:
    """The usage of a successful response body, as the record script takes it ("" when it has none).

    ``"<input> <cached> <output> <reasoning> <provider>|<model>"``.
    """
    try:
        return _encode(provider, _body_decoder.decode(body))
    except (msgspec.ValidationError, *JSON_ERRORS):
        return ""


def from_result_line(provider: str, line: bytes) -> str:
    """The usage in a result line (``response.body.usage``), as :func:`from_body` gives it."""
    try:
        parsed = _line_decoder.decode(line)
    except (msgspec.ValidationError, *JSON_ERRORS):
        return ""
    return _encode(provider, parsed.response.body if parsed.response is not None else None)


async def report(r: Redis, owner: str, days: int) -> tuple[list[UsageRow], str, str]:
    """An owner's usage over the last ``days`` UTC days (today included), newest day first."""
    end = datetime.now(timezone.utc).date()
    dates = [(end - timedelta(days=i)).isoformat() for i in range(days)]
    # One HSCAN per shard and day, all in one pipeline; another round only for a hash that needs
    # more than one page. HSCAN may return a field twice: a shard's field is set, not added.
    found: dict[tuple[int, str], dict[str, int]] = {}
    cursors = {(shard, date): 0 for date in dates for shard in range(keys.SHARDS)}
    while cursors:
        pipe = r.pipeline(transaction=False)
        for (shard, date), cursor in cursors.items():
            pipe.hscan(keys.usage_day(shard, date), cursor, match=f"{owner}|*", count=1000)
        replies = await pipe.execute()
        following: dict[tuple[int, str], int] = {}
        for at, (cursor, fields) in zip(cursors, replies):
            page = found.setdefault(at, {})
            for field, value in fields.items():
                try:
                    page[field.decode()] = int(value)
                except ValueError:
                    continue
            if int(cursor):
                following[at] = int(cursor)
        cursors = following
    rows: list[UsageRow] = []
    for date in dates:
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for shard in range(keys.SHARDS):
            for field, amount in found.get((shard, date), {}).items():
                try:
                    _, provider, model, kind = field.split("|")
                except ValueError:
                    continue
                n = counts.setdefault((provider, model), {})
                n[kind] = n.get(kind, 0) + amount
        for (provider, model), n in sorted(counts.items()):
            get = n.get
            rows.append(
                UsageRow(
                    date=date,
                    provider=provider,
                    model=model,
                    requests=get("requests", 0),
                    input_tokens=get("input", 0),
                    input_tokens_details=InputTokensDetails(cached_tokens=get("cached", 0)),
                    output_tokens=get("output", 0),
                    output_tokens_details=OutputTokensDetails(reasoning_tokens=get("reasoning", 0)),
                    total_tokens=get("input", 0) + get("output", 0),
                )
            )
    return rows, dates[-1], dates[0]
