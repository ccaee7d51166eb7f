"""Weave's IPALLOC_INIT with real agents in a sandbox.

n1, launched without peers but with consensus=3, waits instead of founding alone; once n2
joins it, the two (a quorum of three) found one cluster and each holds a block. n3, an
observer, becomes a member that owns no space, and a pod started on it is refused with one
CNI error line naming the setting. The founding rules themselves are
tests/ipam/test_ipam_founding.py (simulator)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _ipam(rig: AgentBox, node: Any) -> dict[str, Any] | None:
    doc = rig.status(node)
    return None if doc is None else doc["ipam"]


@pytest.mark.timeout(150)
def test_consensus_waits_and_an_observer_owns_nothing(sandbox_factory: Any) -> None:
    box = sandbox_factory(nodes=3)
    rig = AgentBox(box)
    n1, n2, n3 = box.nodes
    rig.launch(n1, extra=["--ipalloc-init", "consensus=3"])
    waiting = rig.wait("n1 to say why it waits", lambda: (
        (ipam := _ipam(rig, n1)) is not None and "founds once 2" in str(ipam.get("detail"))
        and ipam), timeout=30)
    assert waiting["state"] == "waiting_for_cluster"
    assert not waiting["owned_blocks"]

    rig.launch(n2, [n1], extra=["--ipalloc-init", "consensus=3"])
    blocks = rig.wait_mesh([n1, n2], timeout=60)
    assert all(len(owned) == 1 for owned in blocks.values()), blocks

    rig.launch(n3, [n1], extra=["--ipalloc-init", "observer"])
    member = rig.wait("n3 to be an IPAM member", lambda: (
        (ipam := _ipam(rig, n3)) is not None and ipam.get("generation") is not None
        and ipam), timeout=60)
    assert not member["owned_blocks"]

    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    netns = f"{box.prefix}-observerpod"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
    conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
            "socketPath": str(rig.run_dir(n3) / "cni.sock")}
    result = n3.run(["env", "CNI_COMMAND=ADD", "CNI_CONTAINERID=observerpod",
                     f"CNI_NETNS=/run/netns/{netns}", "CNI_IFNAME=eth0",
                     f"CNI_PATH={installed.plugin.parent}", str(installed.plugin)],
                    input=json.dumps(conf), check=False, timeout=30)
    assert result.returncode != 0
    error = json.loads(result.stdout)
    assert "IPAM observer (IPALLOC_INIT=observer)" in error["msg"] + error.get("details", "")
