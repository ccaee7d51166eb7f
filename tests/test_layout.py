"""The tree and docs/architecture.md agree: every module has a row in the module tables, and
every row names a module that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("gossip", "tunnel", "weavepy")


def _modules(*, packages: bool) -> set[str]:
    """Every module of the tree; with `packages`, the packages themselves too (their rows are
    optional: a package's section heading stands for it)."""
    found = set()
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__" or (parts[-1] == "__init__" and not packages):
                continue
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found - set(PACKAGES)


def _table_names() -> set[str]:
    """Backticked names in the first cell of every table row; short names of the agent's
    table (`config`) stand for `weavepy.config`."""
    names = set()
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        for name in re.findall(r"`([a-z_.]+)`", line.split("|")[1]):
            names.add(name if name.split(".")[0] in PACKAGES else f"weavepy.{name}")
    return names


def test_every_module_has_a_row() -> None:
    missing = sorted(_modules(packages=False) - _table_names())
    assert not missing, f"add rows to docs/architecture.md for {missing}"


def test_every_row_names_a_module_that_exists() -> None:
    stale = sorted(_table_names() - _modules(packages=True))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
