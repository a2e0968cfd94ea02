"""``sluice tokens create|list|revoke``: manage the API tokens kept in Redis (service/core/tokens.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from service.core.config import Quotas, Settings
from service.core.connections import REDIS_DOWN, connect
from service.core.log import redact_url
from service.core.tokens import create, list_tokens, revoke


def _quotas_from(args: Any, defaults: Quotas) -> Quotas | None:
    given = {
        k: getattr(args, k)
        for k in ("max_active_batches", "max_stored_bytes", "max_enqueued_lines")
        if getattr(args, k) is not None
    }
    return msgspec.structs.replace(defaults, **given) if given else None


async def run_command(args: Any, settings: Settings) -> int:
    """``sluice tokens create|list|revoke``; returns the exit code (1, with one line, when Redis does not answer)."""
    r = connect(settings, max_connections=2)
    try:
        return await _run(r, args, settings)
    except REDIS_DOWN as e:
        print(f"sluice tokens: cannot reach Redis at {redact_url(settings.redis_url)}: {e}", file=sys.stderr)
        return 1
    finally:
        await r.aclose()


async def _run(r: Any, args: Any, settings: Settings) -> int:
    if args.tokens_command == "create":
        try:
            token = await create(r, args.name, _quotas_from(args, settings.quotas))
        except ValueError as e:
            print(f"sluice tokens: {e}", file=sys.stderr)
            return 1
        print(token)
        print(f"Created token {args.name!r}. It is shown only now: store it safely.", file=sys.stderr)
        return 0
    if args.tokens_command == "list":
        rows = await list_tokens(r)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "id": i,
                            "name": rec.name,
                            "created_at": rec.created_at,
                            **msgspec.to_builtins(rec.quotas or settings.quotas),
                        }
                        for i, rec in rows
                    ]
                )
            )
        else:
            for i, rec in rows:
                q = rec.quotas or settings.quotas
                print(
                    f"{rec.name:24} id={i} created_at={rec.created_at} active_batches<={q.max_active_batches} "
                    f"stored_bytes<={q.max_stored_bytes} enqueued_lines<={q.max_enqueued_lines}"
                )
        return 0
    if await revoke(r, args.name):
        print(f"Revoked token {args.name!r}.", file=sys.stderr)
        return 0
    print(f"sluice tokens: no token named {args.name!r}", file=sys.stderr)
    return 1
