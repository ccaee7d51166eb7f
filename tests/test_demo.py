"""The README's demo command, end to end: plain (VXLAN) and encrypted (WireGuard path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


@pytest.mark.parametrize("extra", [[], ["--encrypt"]], ids=["vxlan", "encrypted"])
def test_demo_shows_pods_talking_across_nodes_and_cleans_up(extra: list[str]) -> None:
    require_root()
    out = subprocess.run([sys.executable, "-m", "weavepy.cli", "demo", *extra],
                         capture_output=True, text=True, cwd=REPO, timeout=170)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "result: everything reaches everything" in text, text
    assert "pod-to-pod across nodes" in text
    assert ("WireGuard" in text) == bool(extra)
    prefix = text.split("sandbox ", 1)[1].split(":", 1)[0]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces
