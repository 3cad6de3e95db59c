"""The tables every bench and eval summary writes: Markdown and CSV text (no torch, so reports render fast)."""

from __future__ import annotations

import csv
import io
from typing import Any


def number(x: Any) -> bool:
    """An int or float, not a bool: what a table cell formats as a number."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def fmt(x: Any, spec: str = "{:.2f}", na: str = "–") -> str:
    """A number formatted for a table cell; anything else (None, a failure text) as ``na``."""
    return spec.format(x) if number(x) else na


def md_table(header: list, rows: list[list], align: str = "") -> str:
    """A Markdown table; ``align``: a letter per column, ``r`` right-aligned (``---:``), else left (missing: left). A
    row given as a string is a line already written."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    seps = "|" + "|".join("---:" if a == "r" else "---" for a in align.ljust(len(header), "l")) + "|"
    return "\n".join([line(header), seps, *(r if isinstance(r, str) else line(r) for r in rows)])


def csv_text(rows: list[dict], columns) -> str:
    """``rows`` as CSV with these columns (a missing or None value: an empty cell)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: "" if r.get(k) is None else r.get(k) for k in columns} for r in rows)
    return buf.getvalue()
