"""Plain-text output shared by the terminal commands (``sluice status``, the API client)."""

from __future__ import annotations


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a table whose columns are left-aligned and two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]
