"""Helpers shared by benchmarks: statistics, spreads, anchors' versions, markdown tables and
PNG plots (matplotlib, Agg).

The rules they keep for every report: a tail is called "p99" only when there are at least
`P99_MIN_SAMPLES` values (below that the nearest-rank p99 *is* the maximum, and says "max");
a ratio comes with its spread; an anchor is named with the version it reports.
"""

from __future__ import annotations

import random
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

PLOTS = Path(__file__).resolve().parent / "plots"
P99_MIN_SAMPLES = 100


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / p99 / max of a sample (p99 by nearest rank; see `tail_label`)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "min": float("nan"), "median": float("nan"), "p99": float("nan"),
                "max": float("nan")}
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"n": len(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "p99": p99, "max": ordered[-1]}


def tail_label(n: int) -> str:
    """"p99" when a sample of `n` has one, else "max" (a p99 over 7 trials is the maximum)."""
    return "p99" if n >= P99_MIN_SAMPLES else "max"


def tail(values: Sequence[float]) -> float:
    """The value `tail_label(len(values))` names."""
    stats = summary(values)
    return stats["p99"] if stats["n"] >= P99_MIN_SAMPLES else stats["max"]


def median_spread(values: Sequence[float], digits: int = 1) -> str:
    """"median (min a, p99|max b)", the tail named honestly for the sample size."""
    stats = summary(values)
    if not stats["n"]:
        return "n/a"
    return (f"{stats['median']:.{digits}f} (min {stats['min']:.{digits}f}, "
            f"{tail_label(int(stats['n']))} {tail(values):.{digits}f})")


def ratio_interval(ours: Sequence[float], theirs: Sequence[float], *, level: float = 0.9,
                   resamples: int = 2000, seed: int = 1) -> tuple[float, float]:
    """A bootstrap interval for median(ours) / median(theirs): each resample draws both
    samples again with replacement. Deterministic (seeded), so a rerun prints the same."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        a = statistics.median(rng.choices(ours, k=len(ours)))
        b = statistics.median(rng.choices(theirs, k=len(theirs)))
        if b > 0:
            ratios.append(a / b)
    ratios.sort()
    if not ratios:
        return float("nan"), float("nan")
    low = ratios[int((1 - level) / 2 * (len(ratios) - 1))]
    high = ratios[int((1 + level) / 2 * (len(ratios) - 1))]
    return low, high


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            return line.strip()
    return None


def debian_version(package: str) -> str | None:
    """The installed Debian package's version, or None."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                          capture_output=True, text=True, timeout=10, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def anchor_version(name: str, argv: Sequence[str] | None, package: str | None) -> str:
    """"name: what `argv` prints (Debian package P V)", for the report's anchor line."""
    said = _first_line(argv) if argv else None
    packaged = debian_version(package) if package else None
    parts = [f"`{' '.join(argv or ())}` says {said!r}" if said else None,
             f"Debian package {package} {packaged}" if packaged else None]
    found = "; ".join(p for p in parts if p) or "version unknown (not installed?)"
    return f"{name}: {found}"


def no_anchor(why: str) -> str:
    """The line a report prints when nothing runs beside weavepy."""
    return f"Anchor: none. {why}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

