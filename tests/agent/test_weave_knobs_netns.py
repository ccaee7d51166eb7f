"""A DaemonSet copied from Weave Net, with real agents: two sandbox nodes launched with nothing
but Weave's variables in their environment (IPALLOC_RANGE, WEAVE_MTU, KUBE_PEERS naming the
other node, WEAVE_PASSWORD, and CONN_LIMIT and HAIRPIN_MODE, which weavepy does not use).

They take the range and the MTU, find each other through KUBE_PEERS, and form an encrypted
cluster whose gossip key is the one derived from the password: a third node given that derived
key as a plain keyring file joins them. Each unused variable is one warning line in the log.
The pure side (parsing, the variable map in docs/migrating-from-weave.md) is
tests/agent/test_weave_knobs.py."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest

from weavepy.config import weave_password_key
from weavepy.devtools.agentbox import REPO, AgentBox
from weavepy.devtools.sandbox import SandboxNode

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RANGE = "198.19.64.0/18"
MTU = 1376
PASSWORD = "correct horse battery staple"
UNUSED = ("CONN_LIMIT", "HAIRPIN_MODE")


def _launch_weave_style(rig: AgentBox, node: SandboxNode, peer: SandboxNode) -> None:
    """The agent as Weave's DaemonSet would start it: settings only in the environment."""
    env = {"IPALLOC_RANGE": RANGE, "WEAVE_MTU": str(MTU), "KUBE_PEERS": peer.underlay_ip,
           "WEAVE_PASSWORD": PASSWORD, "CONN_LIMIT": "200", "HAIRPIN_MODE": "true"}
    argv = [sys.executable, "-m", "weavepy.cli", "--log-level", "info", "launch",
            "--name", node.name, "--state-dir", str(rig.state_dir(node)),
            "--run-dir", str(rig.run_dir(node)), "--profile", rig.profile]
    rig.agents[node.name] = node.start("agent", argv, env=env, cwd=str(REPO))


def _vxlan_mtu(node: SandboxNode) -> int:
    shown = node.run(["ip", "-j", "link", "show", "weavepy.1"]).stdout
    mtu: int = json.loads(shown)[0]["mtu"]
    return mtu


def _alive(rig: AgentBox, node: SandboxNode) -> set[str] | None:
    doc = rig.status(node)
    if doc is None:
        return None
    return {p["name"] for p in doc["peers"] if p["state"] == "alive"}


@pytest.mark.timeout(150)
def test_weave_variables_run_a_cluster(sandbox_factory: Any) -> None:
    box = sandbox_factory(nodes=3)
    rig = AgentBox(box, pod_range=RANGE)
    n1, n2, n3 = box.nodes
    _launch_weave_style(rig, n1, n2)
    _launch_weave_style(rig, n2, n1)
    blocks = rig.wait_mesh([n1, n2], timeout=60)

    for node, peer in ((n1, n2), (n2, n1)):
        doc = rig.status(node)
        assert doc is not None
        assert doc["config"]["ipalloc_range"] == RANGE
        assert doc["dataplane"]["mtu"] == MTU and _vxlan_mtu(node) == MTU
        assert doc["encryption"] is True
        assert [t["peer"] for t in doc["targets"]] == [f"{peer.underlay_ip}:6783"]
        assert all(b.startswith("198.19.") and int(b.split(".")[2]) >= 64
                   for owned in blocks.values() for b in owned), blocks

    # the cluster's gossip key is the password's: a node given only that key joins it
    key = weave_password_key(PASSWORD)
    assert key is not None
    key_file = rig.root / "derived.key"
    key_file.write_text(base64.b64encode(key).decode() + "\n")
    rig.launch(n3, [n1], key_file=key_file)
    rig.wait("n1 to see n2 and n3 alive", lambda: _alive(rig, n1) == {"n2", "n3"}, timeout=45)
    rig.wait_mesh(timeout=45)

    for node in (n1, n2):
        lines = rig.log(node).splitlines()
        unused = [line for line in lines if "is Weave Net's and not used by weavepy" in line]
        assert len(unused) == len(UNUSED), unused
        for var in UNUSED:
            assert len([line for line in unused if f"${var} " in line]) == 1, (var, unused)
        assert all("WARNING" in line for line in unused), unused
        for honoured in ("IPALLOC_RANGE", "WEAVE_MTU", "KUBE_PEERS", "WEAVE_PASSWORD"):
            assert not any(f"${honoured}" in line for line in lines), honoured
        assert PASSWORD not in rig.log(node)
