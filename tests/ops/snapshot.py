"""Snapshot comparison for CLI output: normalise what varies between runs, compare with the
file under tests/ops/snapshots/ (WEAVEPY_UPDATE_SNAPSHOTS=1 rewrites the files)."""

from __future__ import annotations

import os
import re
from pathlib import Path

SNAPSHOTS = Path(__file__).parent / "snapshots"
_RULES = (
    (re.compile(r"\b[0-9a-f]{32}\b"), "<cluster-id>"),
    (re.compile(r"\b198\.19\.\d+\.0/\d+\b"), "<block>"),
    (re.compile(r"(?<=weavepy )\d+\.\d+\.\d+\S*"), "<version>"),
    (re.compile(r"\b\d+(\.\d+)? ?(ms|s)\b"), "<duration>"),
)


def normalise(text: str) -> str:
    """Replace what varies between runs. Column widths vary with the values, so runs of
    spaces inside a line become two (the indentation is kept)."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    lines = []
    for line in text.splitlines():
        body = line.lstrip(" ")
        lines.append(line[:len(line) - len(body)] + re.sub(r" {2,}", "  ", body))
    return "\n".join(lines) + "\n"


def assert_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    got = normalise(text)
    if os.environ.get("WEAVEPY_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
        if os.environ.get("WEAVEPY_UPDATE_SNAPSHOTS") != "1":
            raise AssertionError(f"wrote a new snapshot {path}; check it and commit it")
        return
    assert got == path.read_text(), f"output differs from {path}:\n{got}"
