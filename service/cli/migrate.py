"""``sluice migrate-keys``: move a stopped deployment's Redis data to the sharded key layout (service/core/migrate.py)."""

from __future__ import annotations

import sys

from service.core import migrate
from service.core.config import Settings
from service.core.connections import REDIS_DOWN, Redis, connect, is_cluster
from service.core.log import redact_url


async def run(settings: Settings, *, force: bool, dry_run: bool) -> int:
    """Plan, check that nothing runs, migrate; the exit code (2: refused, 1: Redis down or conflicts)."""
    r = connect(settings, max_connections=2)
    try:
        return await _run(r, force=force, dry_run=dry_run)
    except REDIS_DOWN as e:
        print(f"sluice migrate-keys: cannot reach Redis at {redact_url(settings.redis_url)}: {e}", file=sys.stderr)
        return 1
    finally:
        await r.aclose()


async def _run(r: Redis, *, force: bool, dry_run: bool) -> int:
    if await is_cluster(r):
        print(
            "sluice migrate-keys: REDIS_URL names a Redis Cluster; migrate on the single Redis that holds "
            "the old layout, then move the data to the cluster",
            file=sys.stderr,
        )
        return 2
    running = await migrate.recent_processes(r)
    if running and not force:
        print(
            f"sluice migrate-keys: {len(running)} Sluice process(es) beat in the last {migrate.RECENT_S} s: "
            f"{', '.join(running)}. Stop every web, worker and finalizer first (or pass --force if they "
            "are gone for good).",
            file=sys.stderr,
        )
        return 2
    found = await migrate.plan(r)
    if dry_run:
        for line in migrate.describe(found):
            print(line)
        print(f"{len(found.moves)} key(s) to move, {len(found.deletes)} to delete (dry run: nothing changed)")
        return 0
    if found.empty():
        print("nothing to migrate: no key of the old layout is left")
        return 0
    report = await migrate.migrate(r, found)
    for what, n in sorted(report.moved.items()):
        print(f"moved {n} {what}")
    for what, n in sorted(report.merged.items()):
        print(f"merged {n} {what}")
    print(
        f"moved {report.members} index member(s) to their shards; deleted {report.deleted} transient key(s); "
        f"{report.owners} owner(s) added"
        + (f"; fencing counters raised to {report.lease_seq}" if report.lease_seq else "")
    )
    for key in found.unknown:
        print(f"left as is (not a key Sluice knows): {key}", file=sys.stderr)
    if report.conflicts:
        for c in report.conflicts:
            print(f"sluice migrate-keys: not moved, both keys exist and cannot be merged: {c}", file=sys.stderr)
        return 1
    return 0
