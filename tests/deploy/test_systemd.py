"""deploy/weavepy.service and its example environment file.

`systemd-analyze verify` (Debian package systemd; no systemd needs to run) checks the unit,
with ExecStart pointed at the weavepy installed here, since verify insists the binary exists.
`systemd-analyze security --offline` scores its sandboxing. The example environment file must
load with the agent's own configuration loader."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import require, require_binary
from weavepy.config import load_config

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "weavepy.service"
ENV_EXAMPLE = REPO / "deploy" / "weavepy.env.example"
INSTALLED = Path("/usr/local/bin/weavepy")


def unit_keys(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value, in order (systemd keys may repeat)."""
    keys: dict[tuple[str, str], list[str]] = defaultdict(list)
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys[(section, key.strip())].append(value.strip())
    return keys


def local_unit(tmp_path: Path) -> Path:
    weavepy = Path(sys.executable).with_name("weavepy")  # the venv's console script
    require(weavepy.exists(), f"needs weavepy installed beside {sys.executable}")
    unit = tmp_path / "weavepy.service"
    unit.write_text(UNIT.read_text().replace(str(INSTALLED), str(weavepy)))
    return unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    unit = local_unit(tmp_path)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_sandboxing_exposure_stays_low(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    unit = local_unit(tmp_path)
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    match = re.search(r"Overall exposure level for weavepy\.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 4.0  # 3.2 when written; 10 is an unsandboxed root service


def test_unit_keys() -> None:
    keys = unit_keys(UNIT.read_text())
    service = {k: v for (s, k), v in keys.items() if s == "Service"}
    assert service["ExecStart"] == [f"{INSTALLED} --log-level info launch"]
    assert service["Restart"] == ["always"]
    assert service["EnvironmentFile"] == ["-/etc/weavepy/weavepy.env"]
    assert service["StateDirectory"] == ["weavepy"]
    assert service["RuntimeDirectory"] == ["weavepy"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]  # routes file survives a restart
    assert set(service["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert "ProtectKernelTunables" not in service  # ip_forward must stay writable
    assert keys[("Install", "WantedBy")] == ["multi-user.target"]
    # the directories systemd creates are the ones the agent uses
    env = dict(item.split("=", 1) for value in service["Environment"] for item in value.split())
    config = load_config({"name": "host-a"}, env, None)
    assert str(config.state_dir) == "/var/lib/weavepy" and str(config.run_dir) == "/run/weavepy"


def test_example_environment_loads(tmp_path: Path) -> None:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    keyring = tmp_path / "keyring"
    keyring.write_text("qWm8Lq0eJx0m0mB3jC9m0fO2n3mJ3c2mL0s1a2b3c4d=\n")
    env["WEAVEPY_KEYRING_FILE"] = str(keyring)
    config = load_config({"name": "host-a"}, env, None)
    assert config.peers == ("203.0.113.10", "198.51.100.20:6783")
    assert config.profile == "wan" and config.encrypted
