"""Which lines of a batch go to a provider's own Batch API, and in which provider batches ("parts").

Shared by the web processes, which plan a batch's parts while validating it (service/web/publisher.py)
and pass its delegated lines over while feeding (service/web/feeder.py), and the finalizers, which
run the parts (workers/delegate.py).

A part holds the lines of one provider and one model (OpenAI takes one model per input file) whose
indices lie between ``first`` and ``last``: at most the provider's ``batch_max_lines`` lines and
``batch_max_bytes`` bytes. The plan is written once, before any provider batch exists, and it names
its lines exactly: reading the input file from byte ``start`` and keeping the lines of that provider
and model up to index ``last`` gives them back, in the same order, on any process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

import msgspec

from . import keys
from .config import Provider, Settings, window_seconds
from .connections import Script
from .records import BatchRecord
from .storage import Storage
from .store import Redis
from .validation import Line, Request, check_line, iter_lines


class Part(msgspec.Struct, frozen=True):
    """One provider batch's share of a Sluice batch, as planned."""

    provider: str
    model: str
    first: int  # index of its first line in the batch
    last: int  # index of its last line
    start: int  # byte offset of the input file just past the line before ``first``
    lines: int
    bytes: int  # of the JSONL Sluice uploads (each line plus a newline)


@dataclass
class _Open:
    provider: str
    model: str
    first: int
    start: int
    last: int = 0
    lines: int = 0
    bytes: int = 0

    def closed(self) -> Part:
        return Part(self.provider, self.model, self.first, self.last, self.start, self.lines, self.bytes)


class Planner:
    """Cuts a batch's delegated lines into parts while validation reads them, in order."""

    def __init__(self, settings: Settings, completion_window: str) -> None:
        self.settings = settings
        self.completion_window = completion_window
        self.window_s = window_seconds(completion_window, settings.completion_window_s)
        self.parts: list[_Open] = []
        self.open: dict[tuple[str, str], _Open] = {}
        self.end = 0  # byte offset just past the last line seen
        self.lines = 0
        self.providers: set[str] = set()

    def add(self, index: int, line: Line, request: Request | None, provider: Provider | None) -> None:
        """Note line ``index`` (every line, in order; ``request``/``provider`` None when it is invalid)."""
        start, self.end = self.end, line.end
        if request is None or provider is None or line.data is None:
            return
        if not provider.delegates(self.completion_window, self.window_s):
            return
        size = len(line.data) + 1
        key = (provider.name, request.model)
        part = self.open.get(key)
        if part is None or part.lines + 1 > provider.batch_max_lines or part.bytes + size > provider.batch_max_bytes:
            part = self.open[key] = _Open(provider.name, request.model, index, start)
            self.parts.append(part)
        part.last = index
        part.lines += 1
        part.bytes += size
        self.lines += 1
        self.providers.add(provider.name)

    def plan(self) -> list[Part]:
        """The parts, numbered by their position here (by first line)."""
        return [p.closed() for p in self.parts]


# The parts' plans, written once: a peer that validated the same batch again (its lease ran out) must not reset parts already under way.
_WRITE_PLAN = Script(
    keys=("delegation",),
    args=("*plans",),
    source="""
if redis.call('HEXISTS', KEYS.delegation, 'n') == 1 then return 0 end
redis.call('HSET', KEYS.delegation, 'n', #ARGV)
for i = 1, #ARGV do
  redis.call('HSET', KEYS.delegation, (i - 1) .. ':plan', ARGV[i], (i - 1) .. ':state', 'planned')
end
return 1
""",
)


async def write_plan(r: Redis, batch_id: str, parts: list[Part]) -> None:
    """Record the batch's parts (before it starts; a second call changes nothing)."""
    if parts:
        await _WRITE_PLAN(r, delegation=keys.delegation(batch_id), plans=[msgspec.json.encode(p) for p in parts])


def decode_part(raw: bytes | str) -> Part:
    """A part's plan as ``write_plan`` stored it."""
    return msgspec.json.decode(raw, type=Part)


def encode_providers(names: set[str]) -> str:
    """``deleg_providers`` of a batch's record (``BatchRecord.deleg_providers`` once decoded)."""
    return msgspec.json.encode(sorted(names)).decode()


async def part_lines(
    storage: Storage,
    settings: Settings,
    rec: BatchRecord,
    part: Part,
) -> AsyncIterator[tuple[int, Request, bytes]]:
    """The lines of ``part`` as ``(index, request, line bytes)``, read again from the batch's input file."""
    index = part.first
    async for line in iter_lines(storage, rec.input_key, start=part.start):
        if index > part.last:
            break
        request = check_line(line, rec.endpoint)
        if isinstance(request, Request) and line.data is not None and request.model == part.model:
            provider = settings.provider_for(request.model, rec.provider)
            if provider is not None and provider.name == part.provider:
                yield index, request, line.data
        index += 1
