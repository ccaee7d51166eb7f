"""`enable_ip_forwarding` reads before it writes: an unprivileged agent (read-only /proc/sys,
forwarding already on) must not fail, and forwarding off and unwritable is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require
from weavepy.cni.podnet import PodNetError, enable_ip_forwarding

READ_ONLY_ZERO = "/proc/sys/fs/quota/drops"  # a 0444 sysctl that reads 0: root cannot write it


def test_on_already_is_left_alone(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("1\n")
    os.utime(sysctl, (1, 1))
    enable_ip_forwarding(str(sysctl))
    assert sysctl.read_text() == "1\n" and sysctl.stat().st_mtime == 1


def test_off_is_turned_on(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("0\n")
    enable_ip_forwarding(str(sysctl))
    assert sysctl.read_text().strip() == "1"


def test_off_and_read_only_says_how_to_fix_it() -> None:
    try:
        current = Path(READ_ONLY_ZERO).read_text().strip()
    except OSError:
        current = None
    require(current == "0", f"needs {READ_ONLY_ZERO} reading 0 (a read-only sysctl)")
    with pytest.raises(PodNetError, match=r"sysctl -w net\.ipv4\.ip_forward=1"):
        enable_ip_forwarding(READ_ONLY_ZERO)
