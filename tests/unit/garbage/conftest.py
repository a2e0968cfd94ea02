"""Fixtures of the garbage-input tests: ``harness`` (a factory of :class:`Harness`) and ``h`` (one)."""

from __future__ import annotations

from typing import Any

import pytest

from .harness import Harness


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def factory(**overrides: Any) -> Harness:
        h = Harness(tmp_path / f"data{len(made)}", **overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def h(harness) -> Harness:
    return harness()
