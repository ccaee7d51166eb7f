"""Helpers shared by benchmarks: statistics, markdown tables and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

PLOTS = Path(__file__).resolve().parent / "plots"


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / p99 / max of a sample (p99 by nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "min": float("nan"), "median": float("nan"), "p99": float("nan"),
                "max": float("nan")}
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"n": len(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "p99": p99, "max": ordered[-1]}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

