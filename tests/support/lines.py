"""Batch input lines and JSONL, as tests build and read them."""

from __future__ import annotations

import json
from typing import Any, Iterable

CHAT_URL = "/v1/chat/completions"
DEFAULT_MODEL = "gpt-4o-mini"


def chat_line(
    custom_id: str,
    content: str,
    *,
    model: str = DEFAULT_MODEL,
    url: str = CHAT_URL,
    method: str = "POST",
    **body_extra: Any,
) -> dict:
    """One chat-completions request line; ``body_extra`` goes into ``body`` (e.g. ``mock_status=404``)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], **body_extra}
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def to_jsonl(rows: Iterable[Any]) -> bytes:
    """JSONL bytes: dicts (and other JSON values) are encoded, ``str`` items are written verbatim."""
    out = []
    for row in rows:
        out.append(row if isinstance(row, str) else json.dumps(row, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def parse_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
