"""Resuming a read of an input file at a line's end offset, and the size of the feeding window."""

from __future__ import annotations

import pytest

from service.core.config import MB, MIN_WINDOW_LINES, Settings
from service.core.storage import LocalStorage
from service.core.validation import iter_lines

CONTENT = b"\xef\xbb\xbf" + b'{"a": 1}\r\n\n  \n{"b": 2}\n' + b'{"c": ' + b"3" * 70_000 + b"}\n" + b'{"d": 4}'


async def _collect(storage, key, start=0):
    return [line async for line in iter_lines(storage, key, start=start)]


async def test_resuming_at_any_line_end_yields_exactly_the_rest(tmp_path):
    storage = LocalStorage(tmp_path)

    async def chunks():
        yield CONTENT

    await storage.write("in", chunks())
    lines = await _collect(storage, "in")
    assert [line.data[:6] for line in lines] == [b'{"a": ', b'{"b": ', b'{"c": ', b'{"d": ']
    assert lines[-1].end == len(CONTENT)
    for i, line in enumerate(lines):
        rest = await _collect(storage, "in", start=line.end)
        assert [r.data for r in rest] == [r.data for r in lines[i + 1 :]]
        assert [r.end for r in rest] == [r.end for r in lines[i + 1 :]]


@pytest.mark.parametrize(
    "file_bytes, lines, expected",
    [
        (100 * 200, 100, 10_000),  # small lines: the line bound
        (50_000 * 4096, 50_000, 4096),  # 4 KB lines: 16 MiB of them
        (10 * 8 * MB, 10, MIN_WINDOW_LINES),  # huge lines: never below the floor
        (0, 0, 10_000),
    ],
)
def test_window_is_bounded_in_lines_and_bytes(file_bytes, lines, expected):
    assert Settings().window(file_bytes, lines) == expected


def test_window_settings_come_from_the_environment():
    s = Settings.from_env({"SLUICE_WINDOW_LINES": "500", "SLUICE_WINDOW_BYTES": str(MB)})
    assert (s.window_lines, s.window_bytes) == (500, MB)
    assert s.window(1000 * 100, 1000) == 500
    assert s.window(1000 * 4096, 1000) == 256
