"""How fit results are shown: aligned text tables, intervals, warning banners, and values made
ready for JSON. Shared by `lab fit`, `lab plan` and the study report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fmt(v: Any) -> str:
    """A number in four significant digits ("-" for none or not finite)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    v = float(v)
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.4e}"


def format_table(headers: list[str], rows: list[list]) -> str:
    """Rows of values as an aligned text table."""
    cells = [[str(h) for h in headers]] + [
        [c if isinstance(c, str) else fmt(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def interval(iv: Any) -> str:
    """[lo, hi] as text, or "-" when there is none."""
    if iv is None or not all(math.isfinite(x) for x in iv):
        return "-"
    return f"[{fmt(iv[0])}, {fmt(iv[1])}]"


def warning_banner(warnings: list[str]) -> list[str]:
    """The fit's warnings as the first lines of a report: visible before any number."""
    if not warnings:
        return []
    rule = "!" * 78
    head = f"WARNING: {len(warnings)} problem(s) with this fit; read its numbers with care"
    return [rule, head, *(f"  - {w}" for w in warnings), rule, ""]


def jsonable(obj: Any) -> Any:
    """A copy that `json.dump` writes as strict JSON: NaN and infinities become null, numpy
    scalars Python numbers, tuples lists and keys strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
