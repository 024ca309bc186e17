"""Plain-text tables the command line prints."""
from __future__ import annotations

from typing import List


def text_table(rows: List[List], header: List[str]) -> str:
    """Columns aligned (the first left, the rest right) under a dashed rule; floats to 4 places, NaN as n/a."""

    def cell(c):
        if isinstance(c, float):
            return "n/a" if c != c else f"{c:.4f}"
        return str(c)

    cells = [[str(c) for c in header]] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
