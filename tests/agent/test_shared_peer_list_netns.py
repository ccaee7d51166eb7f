"""A peer list that is the same on every node (a DaemonSet's, or KUBE_PEERS) names each node
itself too. With real agents: three nodes launched with all three addresses form one mesh, and
no agent keeps joining its own address (it did, in a hot loop, until the joiner counted its own
address as joined)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.mark.timeout(120)
def test_every_node_given_the_whole_list_meshes_without_joining_itself(
        sandbox_factory: Any) -> None:
    box = sandbox_factory(nodes=3)
    rig = AgentBox(box)
    for node in box.nodes:
        rig.launch(node, box.nodes)
    rig.wait_mesh(timeout=60)
    time.sleep(3)  # a hot loop would log hundreds of joins in this time
    for node in box.nodes:
        own = f"joined the cluster through {node.underlay_ip}:6783"
        count = rig.log(node).count(own)
        assert count <= 1, f"{node.name} joined itself {count} times"
        doc = rig.status(node)
        assert doc is not None
        own_target = [t for t in doc["targets"] if t["peer"] == f"{node.underlay_ip}:6783"]
        assert own_target and own_target[0]["state"] == "connected", own_target
