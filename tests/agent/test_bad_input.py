"""Bad input to the agent: each mistake gets one clear line and a non-zero exit, or the agent
keeps running, says what is wrong, and recovers once the cause is gone. Nothing is lost
silently (a corrupt state file blocks the start until the operator decides)."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

REPO = Path(__file__).resolve().parents[2]


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.timeout(30)
def test_config_mistakes_are_reported_one_line_each() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEAVE", "IPALLOC"))}
    result = subprocess.run(
        [sys.executable, "-m", "weavepy.cli", "launch", "--ipalloc-range", "198.19.0.0/33",
         "--mtu", "70", "--gossip-port", "0", "--api-addr", "0.0.0.0:6784"],
        capture_output=True, text=True, timeout=20, env=env, cwd=REPO, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 4, result.stderr
    assert any("--ipalloc-range" in e and "198.19.0.0/33" in e for e in errors)
    assert any("--mtu" in e and "576" in e for e in errors)
    assert any("--gossip-port" in e for e in errors)
    assert any("loopback" in e for e in errors)
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_host_bits_in_the_range_get_a_hint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weavepy.cli", "launch", "--ipalloc-range", "198.19.3.0/16"],
        capture_output=True, text=True, timeout=20, cwd=REPO, check=False)
    assert result.returncode != 0
    assert "did you mean 198.19.0.0/16?" in _last_line(result.stderr)


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_a_range_overlapping_host_routes_is_refused(agent_box: Any) -> None:
    rig: AgentBox = agent_box(1)
    node = rig.box.nodes[0]
    node.run(["ip", "route", "add", "198.19.7.0/24", "dev", "eth0"])
    result = node.run(rig.argv(node), check=False, timeout=30)
    assert result.returncode != 0
    line = _last_line(result.stdout + result.stderr)
    assert line.startswith("Error: the cluster range 198.19.0.0/16 overlaps the host's route "
                           "198.19.7.0/24 on eth0"), line
    assert "Traceback" not in result.stderr
    assert rig.dataplane(node).device_up is False, "nothing was created"


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_an_unreachable_peer_is_retried_until_it_comes(agent_box: Any) -> None:
    rig: AgentBox = agent_box(2)
    first, second = rig.box.nodes
    rig.launch(second, [first])  # nobody answers at n1 yet
    rig.wait("n2 to report the failed join", lambda: any(
        t["state"] == "retrying" and t["last_error"]
        for t in (rig.status(second) or {}).get("targets", [])), timeout=30)
    doc = rig.status(second)
    assert doc is not None and doc["ipam"]["state"] == "waiting_for_cluster"
    assert not doc["ready"]
    assert "cannot join 198.18.0.11:6783" in rig.log(second)
    rig.launch(first)
    rig.wait_mesh(timeout=60)


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_a_wrong_gossip_key_is_logged_and_counted(agent_box: Any, tmp_path: Path) -> None:
    rig: AgentBox = agent_box(2)
    first, second = rig.box.nodes
    rig.launch(first)
    rig.wait_api(first)
    other_key = tmp_path / "other.key"
    other_key.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    rig.launch(second, [first], key_file=other_key)
    rig.wait("the wrong key to be named in n2's log",
             lambda: "different gossip key" in rig.log(second), timeout=40)
    drops = rig.wait("n1 to count undecryptable input", lambda: {
        k: v for k, v in (rig.status(first) or {})["gossip"]["drops"].items()
        if "decrypt" in k}, timeout=20)
    assert sum(drops.values()) > 0
    doc = rig.status(first)
    assert doc is not None and [p["name"] for p in doc["peers"]] == []
    assert rig.agents[second.name].alive(), "a wrong key is retried, not fatal"


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_corrupt_state_blocks_the_start_until_reset(agent_box: Any) -> None:
    rig: AgentBox = agent_box(1)
    node = rig.box.nodes[0]
    rig.launch(node)
    rig.wait_mesh(timeout=30)
    stopped = rig.cli(node, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert rig.agents[node.name].wait(timeout=10) == 0
    state = rig.state_dir(node)
    core = state / "ipam-core.json"
    core.write_bytes(core.read_bytes()[: len(core.read_bytes()) // 2])  # a torn write

    first = node.run(rig.argv(node), check=False, timeout=30)
    line = _last_line(first.stderr)
    assert first.returncode != 0
    assert line.startswith(f"Error: IPAM state file {core} is corrupt"), line
    assert "moved aside" in line and "weavepy reset" in line
    again = node.run(rig.argv(node), check=False, timeout=30)
    assert again.returncode != 0
    assert "moved it aside" in _last_line(again.stderr), again.stderr[-500:]

    reset = rig.cli(node, "reset", "--force", "--state-dir", str(state),
                    "--run-dir", str(rig.run_dir(node)))
    assert reset.returncode == 0, reset.stderr
    assert not list(state.iterdir())
    rig.launch(node)
    rig.wait("a fresh start with a block", lambda: (rig.status(node) or {}).get("ready"), 30)

    rig.cli(node, "stop")
    rig.agents[node.name].wait(timeout=10)
    (state / "identity.json").write_text("{not json")
    broken = node.run(rig.argv(node), check=False, timeout=30)
    assert broken.returncode != 0
    assert _last_line(broken.stderr).startswith(
        f"Error: identity file {state / 'identity.json'} is corrupt"), broken.stderr[-500:]
